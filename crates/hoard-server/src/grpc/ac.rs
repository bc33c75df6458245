//! ActionCache: results are served only while complete (the facade checks)
//! and inlined on request within the batch limit; updates go to the facade,
//! which checks them and moves inlined contents into the CAS.

use std::collections::HashSet;
use std::time::Instant;

use bytes::Bytes;
use hoard_disk::{Kind, NamespaceId};
use hoard_proto::reapi::action_cache_server::ActionCache;
use hoard_proto::reapi::{ActionResult, Digest, GetActionResultRequest, UpdateActionResultRequest};
use tonic::{Request, Response, Status};

use super::{Shared, to_status};
use crate::cache::Found;
use crate::error::CacheError;
use crate::validate::{BlobDigest, parse_digest};

pub(crate) struct ActionCacheService(pub Shared);

const SERVICE: &str = "build.bazel.remote.execution.v2.ActionCache";

pub(crate) fn required_digest(what: &str, d: Option<&Digest>) -> Result<BlobDigest, Status> {
    let d = d.ok_or_else(|| Status::invalid_argument(format!("missing {what}")))?;
    parse_digest(d).map_err(|e| Status::invalid_argument(format!("{what}: {}", e.message)))
}

impl ActionCacheService {
    /// Reads a CAS blob whole, if present and of the expected size.
    async fn read_blob(&self, ns: NamespaceId, d: &BlobDigest) -> Result<Option<Vec<u8>>, Status> {
        match self.0.cache.cas_get(ns, &d.hash).await.map_err(to_status)? {
            Some(Found::Empty) => Ok(Some(Vec::new())),
            Some(Found::Blob(mut b)) if b.logical_size() == d.size => match b.read_to_vec() {
                Ok(v) => Ok(Some(v)),
                Err(hoard_disk::Error::Corrupt { .. }) => Ok(None),
                Err(e) => Err(to_status(e.into())),
            },
            _ => Ok(None),
        }
    }

    async fn get(&self, req: GetActionResultRequest) -> Result<Response<ActionResult>, Status> {
        let d = required_digest("action_digest", req.action_digest.as_ref())?;
        let key = self.0.cache.action_key(&req.instance_name, d.hash);
        let ns = self
            .0
            .namespace_for_read(&req.instance_name, Some((Kind::Ac, &key)))
            .await?;
        let found = match ns {
            Some(ns) => self
                .0
                .cache
                .ac_get(ns, &key)
                .await
                .map_err(to_status)?
                .map(|f| (ns, f)),
            None => None,
        };
        let Some((ns, (_, mut ar))) = found else {
            return Err(Status::not_found(format!(
                "action result {}/{} not found",
                d.hash, d.size
            )));
        };
        // Inline what was asked for while it fits the batch limit; what does
        // not fit stays a digest, which the spec allows.
        let mut budget = self.0.max_batch;
        if req.inline_stdout
            && let Some(b) = self.inline(ns, &ar.stdout_digest, &mut budget).await?
        {
            ar.stdout_raw = b;
        }
        if req.inline_stderr
            && let Some(b) = self.inline(ns, &ar.stderr_digest, &mut budget).await?
        {
            ar.stderr_raw = b;
        }
        if !req.inline_output_files.is_empty() {
            let wanted: HashSet<&str> =
                req.inline_output_files.iter().map(String::as_str).collect();
            for f in ar.output_files.iter_mut() {
                if wanted.contains(f.path.as_str())
                    && let Some(b) = self.inline(ns, &f.digest, &mut budget).await?
                {
                    f.contents = b;
                }
            }
        }
        Ok(Response::new(ar))
    }

    /// A blob's bytes for inlining, if it fits what is left of `budget`.
    async fn inline(
        &self,
        ns: NamespaceId,
        digest: &Option<Digest>,
        budget: &mut u64,
    ) -> Result<Option<Bytes>, Status> {
        let Some(d) = digest.as_ref().and_then(|d| parse_digest(d).ok()) else {
            return Ok(None);
        };
        if d.size > *budget {
            return Ok(None);
        }
        // Inlined bytes count under the in-flight budget until the
        // response holding them is encoded.
        let permit = self
            .0
            .cache
            .reserve_inflight(d.size as usize)
            .await
            .map_err(to_status)?;
        let Some(bytes) = self.read_blob(ns, &d).await? else {
            return Ok(None);
        };
        *budget -= d.size;
        Ok(Some(permit.hold(bytes)))
    }

    async fn update(
        &self,
        req: UpdateActionResultRequest,
    ) -> Result<Response<ActionResult>, Status> {
        let ns = self.0.namespace(&req.instance_name)?;
        let d = required_digest("action_digest", req.action_digest.as_ref())?;
        let cache = &self.0.cache;
        let Some(ar) = req.action_result else {
            let e = CacheError::invalid("missing action_result");
            return Err(to_status(cache.refuse(ns, Kind::Ac, e)));
        };
        let stored = cache
            .update_action_result(ns, cache.action_key(&req.instance_name, d.hash), ar)
            .await
            .map_err(to_status)?;
        Ok(Response::new(stored))
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        req: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let req = req.into_inner();
        let hash = digest_hash(req.action_digest.as_ref());
        let r = this.get(req).await;
        self.0
            .observe("unary", SERVICE, "GetActionResult", start, &r);
        self.0.log(|| format!("GRPC AC GET {hash} {}", outcome(&r)));
        r
    }

    async fn update_action_result(
        &self,
        req: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let req = req.into_inner();
        let hash = digest_hash(req.action_digest.as_ref());
        let r = this.update(req).await;
        self.0
            .observe("unary", SERVICE, "UpdateActionResult", start, &r);
        self.0.log(|| format!("GRPC AC PUT {hash} {}", outcome(&r)));
        r
    }
}

/// A request's digest hash as it may appear in the access log.
pub(crate) fn digest_hash(d: Option<&Digest>) -> String {
    d.map(|d| crate::access_log::printable(&d.hash))
        .unwrap_or_default()
}

/// bazel-remote's last words of an access-log line: `OK`, `NOT FOUND`, or
/// the failure.
pub(crate) fn outcome<T>(r: &Result<T, Status>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(s) if s.code() == tonic::Code::NotFound => "NOT FOUND".into(),
        Err(s) => format!("FAILED: {}", crate::access_log::printable(s.message())),
    }
}
