//! Warren CRD types.
