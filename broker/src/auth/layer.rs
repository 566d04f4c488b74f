//! The authentication layer: a tower middleware in front of every gRPC
//! service. It authenticates each call ([`super::Auth::authenticate`]),
//! puts the [`super::Principal`] in the request's extensions for the
//! authorization hooks, counts publish and consume streams against the
//! user's limit for as long as they are open, and ends a deleted user's
//! streams. Health checks pass without credentials (probes carry none).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use super::{Auth, Connection, Slot};

/// Paths open to anyone: the standard health service.
fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Long-lived calls counted against a user's stream limit.
fn is_stream(path: &str) -> bool {
    matches!(path, "/warren.v1.Warren/PublishStream" | "/warren.v1.Warren/Consume")
}

/// Adds authentication to a service.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Auth,
}

impl AuthLayer {
    pub fn new(auth: Auth) -> AuthLayer {
        AuthLayer { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, auth: self.auth.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Auth,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            if is_public(&path) {
                return inner.call(req).await;
            }
            let conn = req.extensions().get::<crate::server::ConnInfo>().map(|c| c.conn.clone());
            let conn = conn.unwrap_or_else(|| Arc::new(Connection::new(([0, 0, 0, 0], 0).into(), None)));
            let principal = match auth.authenticate(&conn, req.headers()).await {
                Ok(p) => p,
                Err(status) => return Ok(status.into_http()),
            };
            let slot = if is_stream(&path) {
                match auth.open_stream(&principal) {
                    Ok(slot) => slot,
                    Err(status) => return Ok(status.into_http()),
                }
            } else {
                None
            };
            let revoked = (!principal.open).then(|| principal.revoked.clone().cancelled_owned());
            req.extensions_mut().insert(principal);
            req.extensions_mut().insert(conn);
            let resp = inner.call(req).await?;
            match revoked {
                None => Ok(resp),
                Some(revoked) => Ok(resp.map(|body| Body::new(Guarded { body, _slot: slot, revoked: Box::pin(revoked), done: false }))),
            }
        })
    }
}

/// A response body that holds the user's stream slot while it is open and
/// ends the call (UNAUTHENTICATED) when the user is deleted.
struct Guarded {
    body: Body,
    _slot: Option<Slot>,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.revoked.as_mut().poll(cx).is_ready() {
            self.done = true;
            let mut trailers = http::HeaderMap::new();
            let status = Status::unauthenticated("the user was deleted");
            let _ = status.add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
