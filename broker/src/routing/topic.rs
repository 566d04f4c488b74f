//! Topic matching: routing keys and binding patterns are words separated by
//! `.`; in a pattern `*` matches exactly one word and `#` zero or more.
//!
//! [`TopicIndex`] is a trie over pattern words, so matching one routing key
//! against thousands of bindings visits only the branches that can match.
//!
//! Matching walks the trie as a non-deterministic automaton: it keeps the
//! *set* of trie nodes the key's words so far can have reached, one step
//! per word, each node at most once per step. A `#` node that consumed a
//! word stays in the set (it may swallow more), and entering a node also
//! enters the `#` child below it (a `#` may swallow nothing). The cost is
//! at most (key words + 1) x (trie nodes), whatever the patterns: a pattern
//! such as `#.#.#.#` cannot make a publish exponential. Runs of `#` are
//! collapsed on insert (`#.#` matches exactly what `#` does), so they do not
//! even add nodes. `#.*` is *not* collapsed: it needs at least one word.

use std::collections::HashMap;

/// Most words in a topic binding pattern. The routing key itself is
/// limited to 255 bytes (AMQP's short string), so a key has at most 128
/// words.
pub const MAX_PATTERN_WORDS: usize = 64;

#[derive(Debug)]
pub struct TopicIndex<T> {
    /// The trie; `nodes[0]` is the root.
    nodes: Vec<Node<T>>,
    len: usize,
}

type NodeId = usize;

#[derive(Debug)]
struct Node<T> {
    words: HashMap<Box<str>, NodeId>,
    star: Option<NodeId>,
    hash: Option<NodeId>,
    /// Reached through a `#` edge: it consumes any further word and stays.
    loops: bool,
    values: Vec<T>,
}

impl<T> Node<T> {
    fn new(loops: bool) -> Self {
        Node { words: HashMap::new(), star: None, hash: None, loops, values: Vec::new() }
    }
}

impl<T> Default for TopicIndex<T> {
    fn default() -> Self {
        TopicIndex { nodes: vec![Node::new(false)], len: 0 }
    }
}

/// The words of a pattern with every run of `#` collapsed to one.
pub fn normalized_words(pattern: &str) -> impl Iterator<Item = &str> {
    let mut previous_hash = false;
    pattern.split('.').filter(move |w| {
        let hash = *w == "#";
        let keep = !(hash && previous_hash);
        previous_hash = hash;
        keep
    })
}

impl<T> TopicIndex<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Trie nodes, the root included (what bounds the cost of a match).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn child(&mut self, at: NodeId, word: &str) -> NodeId {
        let existing = match word {
            "*" => self.nodes[at].star,
            "#" => self.nodes[at].hash,
            w => self.nodes[at].words.get(w).copied(),
        };
        if let Some(id) = existing {
            return id;
        }
        let id = self.nodes.len();
        self.nodes.push(Node::new(word == "#"));
        let node = &mut self.nodes[at];
        match word {
            "*" => node.star = Some(id),
            "#" => node.hash = Some(id),
            w => {
                node.words.insert(w.into(), id);
            }
        }
        id
    }

    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = 0;
        for word in normalized_words(pattern) {
            node = self.child(node, word);
        }
        self.nodes[node].values.push(value);
        self.len += 1;
    }

    /// Adds `node` and the `#` nodes below it (each may match zero words).
    fn enter(&self, mut node: NodeId, set: &mut Vec<NodeId>) {
        set.push(node);
        while let Some(hash) = self.nodes[node].hash {
            set.push(hash);
            node = hash;
        }
    }

    /// Calls `f` once for the value of every pattern matching
    /// `routing_key` (patterns that normalize to the same words are one
    /// trie node: each of their values is reported once).
    pub fn for_each_match<'a>(&'a self, routing_key: &str, f: &mut impl FnMut(&'a T)) {
        let mut current: Vec<NodeId> = Vec::new();
        let mut next: Vec<NodeId> = Vec::new();
        self.enter(0, &mut current);
        for word in routing_key.split('.') {
            next.clear();
            for &id in &current {
                let node = &self.nodes[id];
                if let Some(&child) = node.words.get(word) {
                    self.enter(child, &mut next);
                }
                if let Some(star) = node.star {
                    self.enter(star, &mut next);
                }
                if node.loops {
                    self.enter(id, &mut next);
                }
            }
            next.sort_unstable();
            next.dedup();
            std::mem::swap(&mut current, &mut next);
            if current.is_empty() {
                return;
            }
        }
        for id in current {
            self.nodes[id].values.iter().for_each(&mut *f);
        }
    }
}

/// The specification, written as directly as possible; the trie is tested
/// against it.
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((w, rest)) => k.first() == Some(w) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = routing_key.split('.').collect();
    go(&p, &k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn index_matches(patterns: &[String], key: &str) -> BTreeSet<usize> {
        let mut idx = TopicIndex::new();
        for (i, p) in patterns.iter().enumerate() {
            idx.insert(p, i);
        }
        let mut out = BTreeSet::new();
        idx.for_each_match(key, &mut |i| {
            out.insert(*i);
        });
        out
    }

    #[test]
    fn should_match_the_documented_examples() {
        let cases = [
            ("*.orange.*", "quick.orange.rabbit", true),
            ("*.*.rabbit", "quick.orange.rabbit", true),
            ("lazy.#", "lazy.orange.elephant", true),
            ("*.orange.*", "quick.orange.fox", true),
            ("lazy.#", "lazy.brown.fox", true),
            ("lazy.#", "lazy", true),
            ("*.*.rabbit", "quick.brown.fox", false),
            ("*.orange.*", "orange", false),
            ("*.orange.*", "quick.orange.male.rabbit", false),
            ("lazy.#", "lazy.orange.male.rabbit", true),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("*", "", true),
            ("*", "a.b", false),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.#.b", "a.x.y.c", false),
            ("#.#", "a", true),
            ("", "", true),
            ("a", "", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(matches(pattern, key), expected, "{pattern} vs {key}");
            assert_eq!(!index_matches(&[pattern.to_string()], key).is_empty(), expected, "trie: {pattern} vs {key}");
        }
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("c".to_string()), Just(String::new())]
    }

    fn pattern_word() -> impl Strategy<Value = String> {
        prop_oneof![word(), Just("*".to_string()), Just("#".to_string())]
    }

    proptest! {
        #[test]
        fn trie_agrees_with_the_reference_matcher(
            patterns in prop::collection::vec(prop::collection::vec(pattern_word(), 1..8).prop_map(|w| w.join(".")), 1..12),
            key in prop::collection::vec(word(), 1..10).prop_map(|w| w.join(".")),
        ) {
            let expected: BTreeSet<usize> = patterns.iter().enumerate().filter(|(_, p)| matches(p, &key)).map(|(i, _)| i).collect();
            prop_assert_eq!(index_matches(&patterns, &key), expected);
        }

        #[test]
        fn collapsing_runs_of_hash_keeps_the_meaning(
            pattern in prop::collection::vec(pattern_word(), 1..8),
            key in prop::collection::vec(word(), 1..8).prop_map(|w| w.join(".")),
        ) {
            let pattern = pattern.join(".");
            let collapsed: Vec<&str> = normalized_words(&pattern).collect();
            prop_assert!(!collapsed.windows(2).any(|w| w == ["#", "#"]));
            prop_assert_eq!(matches(&collapsed.join("."), &key), matches(&pattern, &key));
        }
    }

    /// `#` twenty times: the reference (backtracking) matcher, like the old
    /// recursive trie walk, takes time exponential in the number of `#`; the
    /// set-of-nodes walk is linear.
    #[test]
    fn should_match_a_run_of_hashes_against_a_long_key() {
        let hashes = vec!["#"; 20].join(".");
        let key = (0..100).map(|i| format!("w{i}")).collect::<Vec<_>>().join(".");
        let patterns = [
            hashes.clone(),                               // matches
            format!("{hashes}.w99"),                      // matches: ends with w99
            format!("{hashes}.nope"),                     // no: the last word differs
            format!("w0.{hashes}.w50.{hashes}.w99"),      // matches
            format!("w0.{hashes}.w50.{hashes}.w50"),      // no
            format!("{}.#", vec!["*"; 100].join(".")),    // matches: 100 words, then none
            format!("{}.*.#", vec!["*"; 100].join(".")),  // no: needs 101 words
            format!("#.*.{}", vec!["#.*"; 60].join(".")), // matches: at least 61 words
        ];
        let patterns: Vec<String> = patterns.into_iter().collect();
        let mut idx = TopicIndex::new();
        for (i, p) in patterns.iter().enumerate() {
            idx.insert(p, i);
        }
        let mut found = BTreeSet::new();
        idx.for_each_match(&key, &mut |i| {
            found.insert(*i);
        });
        assert_eq!(found, BTreeSet::from([0, 1, 3, 5, 7]));
        // The run of `#` is one trie node, not twenty.
        let mut one = TopicIndex::new();
        one.insert(&hashes, ());
        assert_eq!(one.node_count(), 2);
    }

    #[test]
    fn should_collapse_only_runs_of_hash() {
        assert_eq!(normalized_words("#.#.a.#.#.#").collect::<Vec<_>>(), vec!["#", "a", "#"]);
        assert_eq!(normalized_words("#.*.#").collect::<Vec<_>>(), vec!["#", "*", "#"]);
        // `#.*` needs a word where `#` needs none.
        assert!(matches("a.#", "a"));
        assert!(!matches("a.#.*", "a"));
        assert!(index_matches(&["a.#".into()], "a").contains(&0));
        assert!(index_matches(&["a.#.*".into(), "a.#.#.*".into()], "a").is_empty());
        assert_eq!(index_matches(&["a.#.*".into(), "a.#.#.*".into()], "a.b"), BTreeSet::from([0, 1]));
    }
}
