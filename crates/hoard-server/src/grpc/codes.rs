//! The codes REAPI clients expect for requests hoard cannot even decode.
//!
//! tonic answers a request message that does not decode with INTERNAL and
//! one over the size limit with OUT_OF_RANGE, before any handler runs. Both
//! are the client's fault: INVALID_ARGUMENT and RESOURCE_EXHAUSTED are
//! right (an INTERNAL makes Bazel retry a request that can never succeed).
//! [`StatusFix`] rewrites those answers on every method; streaming
//! handlers, which see the same errors from their request stream, use
//! [`from_request_stream`]. Every message is bounded by [`clip`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Code, Status};

/// The longest message a status carries; longer ones are cut (a client's
/// 20 KB resource name must not come back in a header).
pub const MAX_MESSAGE: usize = 512;

/// `s` cut to at most `max` bytes on a character boundary, marked when cut.
pub fn clip_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// A status message bounded to [`MAX_MESSAGE`].
pub fn clip(s: &str) -> String {
    clip_to(s, MAX_MESSAGE)
}

/// The status a client should see for `s`, which tonic produced while
/// reading a request message.
pub fn from_request_stream(s: Status) -> Status {
    let msg = s.message();
    match s.code() {
        Code::Internal if msg.starts_with("failed to decode Protobuf message") => {
            Status::invalid_argument(clip(&format!("request message does not decode: {msg}")))
        }
        Code::OutOfRange if msg.contains("message length too large") => {
            Status::resource_exhausted(clip(&format!("request message too large: {msg}")))
        }
        _ => Status::new(s.code(), clip(msg)),
    }
}

/// Tower layer applying [`from_request_stream`] to error answers that
/// carry their status in the response headers (unary and server-streaming
/// calls whose request did not decode).
#[derive(Clone, Copy, Default)]
pub struct StatusFixLayer;

impl<S> tower_layer::Layer<S> for StatusFixLayer {
    type Service = StatusFix<S>;

    fn layer(&self, inner: S) -> StatusFix<S> {
        StatusFix(inner)
    }
}

#[derive(Clone)]
pub struct StatusFix<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for StatusFix<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            fix_headers(resp.headers_mut());
            Ok(resp)
        })
    }
}

fn fix_headers(h: &mut http::HeaderMap) {
    let Some(status) = Status::from_header_map(h) else {
        return;
    };
    if status.code() == Code::Ok {
        return;
    }
    let fixed = from_request_stream(status.clone());
    if fixed.code() == status.code() && fixed.message() == status.message() {
        return;
    }
    h.remove("grpc-status");
    h.remove("grpc-message");
    h.remove("grpc-status-details-bin");
    let _ = fixed.add_header(h);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_size_errors_become_client_errors() {
        let s = from_request_stream(Status::internal(
            "failed to decode Protobuf message: invalid wire type",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        let s = from_request_stream(Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 1 bytes",
        ));
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s = from_request_stream(Status::out_of_range("read_offset 9 is past the end"));
        assert_eq!(s.code(), Code::OutOfRange);
        let long = "é".repeat(20_000);
        let s = from_request_stream(Status::invalid_argument(long));
        assert!(s.message().len() < MAX_MESSAGE + 32);
    }

    #[test]
    fn headers_are_rewritten() {
        let mut h = http::HeaderMap::new();
        Status::internal("failed to decode Protobuf message: buffer underflow")
            .add_header(&mut h)
            .unwrap();
        fix_headers(&mut h);
        let s = Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}

/// Tower layer asking the facade, once per call and before any message is
/// decoded, whether the call's credentials (the `authorization` metadata,
/// HTTP Basic) allow it: writes are UpdateActionResult, BatchUpdateBlobs
/// and ByteStream Write; health checks are open; everything else reads.
/// The identity found goes into the request's extensions.
#[derive(Clone)]
pub struct AuthLayer(pub crate::Cache);

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthCheck<S>;

    fn layer(&self, inner: S) -> AuthCheck<S> {
        AuthCheck {
            inner,
            cache: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthCheck<S> {
    inner: S,
    cache: crate::Cache,
}

/// What a gRPC method does, by its path; None for the open ones.
pub fn access_of(path: &str) -> Option<crate::auth::Access> {
    use crate::auth::Access;
    if path.starts_with("/grpc.health.v1.Health/") {
        return None;
    }
    Some(match path {
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"
        | "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
        | "/google.bytestream.ByteStream/Write" => Access::Write,
        _ => Access::Read,
    })
}

impl<S, B, R> tower_service::Service<http::Request<B>> for AuthCheck<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The connection's handle: it knows the client certificate.
        let cache = req
            .extensions()
            .get::<crate::listener::ConnectInfo>()
            .and_then(|i| i.cache.clone())
            .unwrap_or_else(|| self.cache.clone());
        Box::pin(async move {
            if let Some(access) = access_of(req.uri().path()) {
                let creds = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| crate::auth::parse_basic(v.as_bytes()));
                match cache.authorize(creds, access).await {
                    Ok(identity) => {
                        req.extensions_mut().insert(identity);
                    }
                    Err(e) => return Ok(super::to_status(e).into_http()),
                }
            }
            inner.call(req).await
        })
    }
}
