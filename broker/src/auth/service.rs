//! The `warren.v1.Users` service: users, permissions and limits through
//! the API (`warrenctl user ...`, the operator's `User` and `Permission`
//! resources). Every change is an audit line naming who made it.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use warren_client::proto::{self, users_server::Users};

use super::authz::{self, Operation};
use super::users::{self, PermissionSpec, Source, TopicSpec, UserRecord};
use super::{Auth, authenticated};

/// The `Users` service.
pub struct UsersService {
    auth: Auth,
}

impl UsersService {
    pub fn new(auth: Auth) -> UsersService {
        UsersService { auth }
    }
}

fn spec_from_proto(p: proto::Permissions) -> PermissionSpec {
    PermissionSpec {
        configure: p.configure,
        write: p.write,
        read: p.read,
        topics: p.topics.into_iter().map(|(k, t)| (k, TopicSpec { write: t.write, read: t.read })).collect(),
    }
}

pub fn spec_to_proto(s: &PermissionSpec) -> proto::Permissions {
    proto::Permissions {
        configure: s.configure.clone(),
        write: s.write.clone(),
        read: s.read.clone(),
        topics: s
            .topics
            .iter()
            .map(|(k, t)| (k.clone(), proto::TopicPermission { write: t.write.clone(), read: t.read.clone() }))
            .collect(),
    }
}

fn audit<T>(req: &Request<T>, action: &str, user: &str) {
    let (who, peer) = authenticated(req);
    tracing::info!(target: "warren::audit", by = %who.name, peer, action, user, "user management");
}

#[tonic::async_trait]
impl Users for UsersService {
    async fn put_user(&self, req: Request<proto::PutUserRequest>) -> Result<Response<proto::PutUserResponse>, Status> {
        authz::check(&req, Operation::ManageUsers)?;
        audit(&req, "put_user", &req.get_ref().name);
        let r = req.into_inner();
        users::validate_name(&r.name).map_err(Status::invalid_argument)?;
        let existing = self.auth.record(&r.name).filter(|(_, s)| *s == Source::Stored).map(|(rec, _)| rec);
        let password_hash = if !r.password_hash.is_empty() {
            Some(r.password_hash)
        } else if !r.password.is_empty() {
            let password = r.password;
            Some(
                tokio::task::spawn_blocking(move || users::hash_password(&password))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(Status::internal)?,
            )
        } else if r.keep_password {
            existing.as_ref().and_then(|e| e.password_hash.clone())
        } else {
            None
        };
        let record = UserRecord {
            name: r.name,
            password_hash,
            tags: r.tags,
            // Permissions are set apart (SetPermissions); a re-put keeps them.
            permissions: existing.and_then(|e| e.permissions),
            max_connections: r.max_connections,
            max_streams: r.max_streams,
        };
        self.auth.put_user(record).await?;
        Ok(Response::new(proto::PutUserResponse { authentication_off: !self.auth.enabled() }))
    }

    async fn delete_user(&self, req: Request<proto::DeleteUserRequest>) -> Result<Response<proto::DeleteUserResponse>, Status> {
        authz::check(&req, Operation::ManageUsers)?;
        audit(&req, "delete_user", &req.get_ref().name);
        let existed = self.auth.delete_user(&req.into_inner().name).await?;
        Ok(Response::new(proto::DeleteUserResponse { existed }))
    }

    async fn list_users(&self, req: Request<proto::ListUsersRequest>) -> Result<Response<proto::ListUsersResponse>, Status> {
        authz::check(&req, Operation::ListUsers)?;
        let table = self.auth.table();
        let sorted: BTreeMap<_, _> = table.users.iter().collect();
        let users = sorted
            .into_values()
            .map(|u| {
                let (connections, streams) = self.auth.usage(&u.record.name);
                proto::UserInfo {
                    name: u.record.name.clone(),
                    tags: u.record.tags.clone(),
                    has_password: u.record.password_hash.is_some(),
                    permissions: u.record.permissions.as_ref().map(spec_to_proto),
                    max_connections: u.record.max_connections,
                    max_streams: u.record.max_streams,
                    source: u.source.as_str().to_string(),
                    connections,
                    streams,
                }
            })
            .collect();
        Ok(Response::new(proto::ListUsersResponse { users }))
    }

    async fn set_permissions(&self, req: Request<proto::SetPermissionsRequest>) -> Result<Response<proto::SetPermissionsResponse>, Status> {
        authz::check(&req, Operation::ManageUsers)?;
        audit(&req, "set_permissions", &req.get_ref().user);
        let r = req.into_inner();
        users::validate_name(&r.user).map_err(Status::invalid_argument)?;
        let spec = spec_from_proto(r.permissions.unwrap_or_default());
        users::Permissions::compile(&spec).map_err(Status::invalid_argument)?;
        let mut record = match self.auth.record(&r.user) {
            Some((rec, Source::Stored)) => rec,
            Some((_, Source::Config)) => {
                return Err(Status::failed_precondition(format!(
                    "user '{}' is defined in the broker's configuration and cannot be changed through the API",
                    r.user
                )));
            }
            None => {
                UserRecord { name: r.user, password_hash: None, tags: vec![], permissions: None, max_connections: None, max_streams: None }
            }
        };
        record.permissions = Some(spec);
        self.auth.put_user(record).await?;
        Ok(Response::new(proto::SetPermissionsResponse {}))
    }

    async fn clear_permissions(
        &self,
        req: Request<proto::ClearPermissionsRequest>,
    ) -> Result<Response<proto::ClearPermissionsResponse>, Status> {
        authz::check(&req, Operation::ManageUsers)?;
        audit(&req, "clear_permissions", &req.get_ref().user);
        let r = req.into_inner();
        match self.auth.record(&r.user) {
            Some((_, Source::Config)) => {
                return Err(Status::failed_precondition(format!(
                    "user '{}' is defined in the broker's configuration and cannot be changed through the API",
                    r.user
                )));
            }
            // A record that only carried permissions (a ServiceAccount)
            // goes entirely.
            Some((rec, Source::Stored))
                if rec.password_hash.is_none() && rec.tags.is_empty() && rec.max_connections.is_none() && rec.max_streams.is_none() =>
            {
                self.auth.delete_user(&r.user).await?;
            }
            Some((mut rec, Source::Stored)) => {
                rec.permissions = None;
                self.auth.put_user(rec).await?;
            }
            None => {}
        }
        Ok(Response::new(proto::ClearPermissionsResponse {}))
    }

    async fn who_am_i(&self, req: Request<proto::WhoAmIRequest>) -> Result<Response<proto::WhoAmIResponse>, Status> {
        let (p, _) = authenticated(&req);
        let (tags, permissions) = match &p.user {
            Some(u) => (u.record.tags.clone(), u.record.permissions.as_ref().map(spec_to_proto)),
            None if p.open => (vec!["administrator".to_string()], Some(spec_to_proto(&PermissionSpec::all()))),
            None => (vec![], None),
        };
        Ok(Response::new(proto::WhoAmIResponse {
            user: p.name.to_string(),
            mechanism: p.mechanism.as_str().to_string(),
            tags,
            permissions,
            authentication_enabled: self.auth.enabled(),
        }))
    }
}
