//! ContentAddressableStorage: existence checks, batch reads and writes, and
//! GetTree with paging.

use std::collections::{HashSet, VecDeque};

use std::time::Instant;

use bytes::Bytes;
use hoard_disk::{Kind, NamespaceId};
use hoard_proto::google::rpc::Status as RpcStatus;
use hoard_proto::prost::Message;
use hoard_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use hoard_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, Digest, Directory, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetTreeRequest, GetTreeResponse, batch_read_blobs_response, batch_update_blobs_response,
    compressor,
};
use tonic::{Code, Request, Response, Status};

use super::{BoxStream, Shared, to_status};
use crate::cache::{Encoding, Found};
use crate::error::CacheError;
use crate::validate::{BlobDigest, parse_digest};

pub(crate) struct CasService(pub Shared);

const SERVICE: &str = "build.bazel.remote.execution.v2.ContentAddressableStorage";
/// Directories per GetTree page when the client asks for none or more.
const MAX_TREE_PAGE: usize = 10_000;

fn rpc_status(code: Code, message: impl Into<String>) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    })
}

fn ok_status() -> Option<RpcStatus> {
    rpc_status(Code::Ok, "")
}

impl CasService {
    async fn find_missing(
        &self,
        req: FindMissingBlobsRequest,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        // Validate everything first: one malformed digest fails the call.
        let mut parsed = Vec::with_capacity(req.blob_digests.len());
        for d in &req.blob_digests {
            parsed.push(parse_digest(d).map_err(|e| Status::invalid_argument(e.message))?);
        }
        let probe = parsed.first().map(|p| (Kind::Cas, &p.hash));
        let Some(ns) = self.0.namespace_for_read(&req.instance_name, probe).await? else {
            // A namespace never written here: everything is missing.
            return Ok(Response::new(FindMissingBlobsResponse {
                missing_blob_digests: req.blob_digests,
            }));
        };
        let available = self.0.cache.cas_available(ns, &parsed).await;
        if let Some(log) = &self.0.access_log {
            log.grpc_batch(|b| {
                let mut hex = [0u8; 64];
                for (p, found) in parsed.iter().zip(&available) {
                    let word = if *found { "OK" } else { "NOT FOUND" };
                    b.line(format_args!(
                        "GRPC CAS HEAD {} {word}",
                        p.hash.hex_into(&mut hex)
                    ));
                }
            });
        }
        let missing: Vec<Digest> = req
            .blob_digests
            .into_iter()
            .zip(available)
            .filter_map(|(d, found)| (!found).then_some(d))
            .collect();
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update(
        &self,
        req: BatchUpdateBlobsRequest,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let ns = self.0.namespace(&req.instance_name)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > self.0.max_batch {
            return Err(Status::invalid_argument(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes {}; use ByteStream for large blobs",
                self.0.max_batch
            )));
        }
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in req.requests {
            let status = self
                .update_one(ns, r.digest.as_ref(), r.data, r.compressor)
                .await;
            self.0.log(|| {
                let hash = super::ac::digest_hash(r.digest.as_ref());
                match status.code {
                    0 => format!("GRPC CAS PUT {hash} OK"),
                    _ => format!(
                        "GRPC CAS PUT {hash} FAILED: {}",
                        crate::access_log::printable(&status.message)
                    ),
                }
            });
            responses.push(batch_update_blobs_response::Response {
                digest: r.digest,
                status: Some(status),
            });
        }
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn update_one(
        &self,
        ns: NamespaceId,
        digest: Option<&Digest>,
        data: Bytes,
        comp: i32,
    ) -> RpcStatus {
        let cache = &self.0.cache;
        let r = match parse_blob_request(digest, comp) {
            Ok((d, encoding)) => {
                let body = futures_util::stream::iter([Ok(data)]);
                cache
                    .put(ns, Kind::Cas, d.hash, d.size, encoding, body)
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(cache.refuse(ns, Kind::Cas, e)),
        };
        match r {
            Ok(()) => RpcStatus {
                code: 0,
                message: String::new(),
                details: Vec::new(),
            },
            Err(e) => RpcStatus {
                code: e.grpc_code() as i32,
                message: super::codes::clip(&e.message),
                details: Vec::new(),
            },
        }
    }

    async fn batch_read(
        &self,
        req: BatchReadBlobsRequest,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let probe = req.digests.first().and_then(|d| parse_digest(d).ok());
        let ns = self
            .0
            .namespace_for_read(
                &req.instance_name,
                probe.as_ref().map(|p| (Kind::Cas, &p.hash)),
            )
            .await?;
        let total: u64 = req.digests.iter().map(|d| d.size_bytes.max(0) as u64).sum();
        if total > self.0.max_batch {
            return Err(Status::invalid_argument(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes {}; use ByteStream for large blobs",
                self.0.max_batch
            )));
        }
        let zstd_ok = req
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        // The blobs read count under the budget until tonic has encoded
        // the response (the permit rides on the first blob's bytes).
        let mut permit = Some(
            self.0
                .cache
                .reserve_inflight(total as usize)
                .await
                .map_err(to_status)?,
        );
        let mut responses = Vec::with_capacity(req.digests.len());
        for d in req.digests {
            let one = match ns {
                Some(ns) => self.read_one(ns, d, zstd_ok, &mut permit).await,
                None => batch_read_blobs_response::Response {
                    status: rpc_status(
                        Code::NotFound,
                        format!(
                            "blob {}/{} not found",
                            super::ac::digest_hash(Some(&d)),
                            d.size_bytes
                        ),
                    ),
                    digest: Some(d),
                    data: Bytes::new(),
                    compressor: compressor::Value::Identity as i32,
                },
            };
            self.0.log(|| {
                let hash = super::ac::digest_hash(one.digest.as_ref());
                match one.status.as_ref().map(|s| s.code) {
                    Some(0) => format!("GRPC CAS GET {hash} OK"),
                    Some(c) if c == Code::NotFound as i32 => {
                        format!("GRPC CAS GET {hash} NOT FOUND")
                    }
                    _ => format!("GRPC CAS GET {hash} FAILED"),
                }
            });
            responses.push(one);
        }
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    async fn read_one(
        &self,
        ns: NamespaceId,
        d: Digest,
        zstd_ok: bool,
        permit: &mut Option<crate::budget::Permit>,
    ) -> batch_read_blobs_response::Response {
        let mut r = batch_read_blobs_response::Response {
            digest: Some(d.clone()),
            data: Bytes::new(),
            status: None,
            compressor: compressor::Value::Identity as i32,
        };
        let p = match parse_digest(&d) {
            Ok(p) => p,
            Err(e) => {
                r.status = rpc_status(Code::InvalidArgument, e.message);
                return r;
            }
        };
        let not_found = || {
            rpc_status(
                Code::NotFound,
                format!("blob {}/{} not found", p.hash, p.size),
            )
        };
        // The budget permit rides on the first blob with bytes.
        let mut held = |v: Bytes| match permit.take() {
            Some(p) if !v.is_empty() => p.hold_shared(v),
            p => {
                *permit = p;
                v
            }
        };
        // A hot blob costs no file at all. A client that accepts zstd gets
        // the stored frames instead, as a compressed ByteStream read does.
        let hot = match zstd_ok {
            false => self.0.cache.cas_hot(ns, &p.hash),
            true => None,
        };
        if let Some(bytes) = hot {
            if bytes.len() as u64 == p.size {
                r.data = held(bytes);
                r.status = ok_status();
            } else {
                r.status = not_found();
            }
            return r;
        }
        match self.0.cache.cas_get(ns, &p.hash).await {
            Ok(Some(Found::Empty)) => r.status = ok_status(),
            Ok(Some(Found::Blob(mut b))) if b.logical_size() == p.size => {
                let data = if zstd_ok && b.is_zstd_stream() {
                    r.compressor = compressor::Value::Zstd as i32;
                    read_stored(&mut b).map(Bytes::from)
                } else if p.size <= crate::cache::HOT_BLOB_MAX {
                    self.0.cache.cas_read_small(ns, &p.hash, &mut b)
                } else {
                    b.read_to_vec().map(Bytes::from)
                };
                match data {
                    Ok(v) => {
                        r.data = held(v);
                        r.status = ok_status();
                    }
                    Err(hoard_disk::Error::Corrupt { .. }) => r.status = not_found(),
                    Err(e) => r.status = rpc_status(Code::Internal, CacheError::from(e).message),
                }
            }
            Ok(_) => r.status = not_found(),
            Err(e) => {
                let s = to_status(e);
                r.status = rpc_status(s.code(), s.message());
            }
        }
        r
    }

    /// Reads one Directory under the budget (its bytes count while it is
    /// parsed). `Ok(None)` when it is missing or does not parse, except
    /// that a Directory too large for any page is an error.
    async fn read_directory(
        &self,
        ns: NamespaceId,
        d: &BlobDigest,
    ) -> Result<Option<Directory>, Status> {
        if d.size > self.0.max_batch {
            return Err(Status::failed_precondition(format!(
                "directory {}/{} is larger than a GetTree page may be ({} bytes); read it with ByteStream",
                d.hash, d.size, self.0.max_batch
            )));
        }
        let _permit = self
            .0
            .cache
            .reserve_inflight(2 * d.size as usize)
            .await
            .map_err(to_status)?;
        let bytes = match self.0.cache.cas_get(ns, &d.hash).await.map_err(to_status)? {
            Some(Found::Empty) => Vec::new(),
            Some(Found::Blob(mut b)) if b.logical_size() == d.size => match b.read_to_vec() {
                Ok(v) => v,
                Err(hoard_disk::Error::Corrupt { .. }) => return Ok(None),
                Err(e) => return Err(to_status(e.into())),
            },
            _ => return Ok(None),
        };
        Ok(Directory::decode(bytes.as_slice()).ok())
    }

    /// Starts a GetTree walk: the root is read and checked here, so a
    /// missing or malformed root fails the call itself; the pages follow
    /// lazily, each built only when the client takes the previous one.
    async fn get_tree(&self, req: GetTreeRequest) -> Result<TreeWalk, Status> {
        let root = super::ac::required_digest("root_digest", req.root_digest.as_ref())?;
        let not_found =
            || Status::not_found(format!("tree root {}/{} not found", root.hash, root.size));
        let Some(ns) = self
            .0
            .namespace_for_read(&req.instance_name, Some((Kind::Cas, &root.hash)))
            .await?
        else {
            return Err(not_found());
        };
        let skip: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "invalid page_token {:?}",
                    super::codes::clip_to(&req.page_token, 100)
                ))
            })?
        };
        let page_size = match req.page_size {
            n if n <= 0 => MAX_TREE_PAGE,
            n => (n as usize).min(MAX_TREE_PAGE),
        };
        if self
            .0
            .cache
            .cas_get(ns, &root.hash)
            .await
            .map_err(to_status)?
            .is_none()
        {
            return Err(not_found());
        }
        let Some(root_dir) = self.read_directory(ns, &root).await? else {
            return Err(Status::invalid_argument(format!(
                "root_digest {}/{} is not a Directory (or not of that size)",
                root.hash, root.size
            )));
        };
        Ok(TreeWalk {
            svc: CasService(self.0.clone()),
            ns,
            next: Some(root_dir),
            queue: VecDeque::new(),
            seen: HashSet::from([root]),
            index: 0,
            skip,
            page_size,
            page_bytes: self.0.max_batch as usize,
            done: false,
        })
    }
}

/// Most distinct directories one GetTree call walks: what the walk
/// remembers (digests queued and seen) stays bounded.
const MAX_TREE_DIRECTORIES: usize = 100_000;

/// A breadth-first walk over a tree, each distinct directory once. The page
/// token is the number of directories already returned: the walk is
/// deterministic for a given tree, so a later page replays it to there.
/// A missing or malformed child is left out: the spec returns the part of
/// the tree that is present.
pub(crate) struct TreeWalk {
    svc: CasService,
    ns: NamespaceId,
    /// The directory read last, not yet placed in a page.
    next: Option<Directory>,
    queue: VecDeque<BlobDigest>,
    seen: HashSet<BlobDigest>,
    index: usize,
    skip: usize,
    page_size: usize,
    page_bytes: usize,
    done: bool,
}

impl TreeWalk {
    async fn next_page(&mut self) -> Option<Result<GetTreeResponse, Status>> {
        if self.done {
            return None;
        }
        let mut page = GetTreeResponse::default();
        let mut bytes = 0usize;
        loop {
            let dir = match self.next.take() {
                Some(d) => d,
                None => match self.pop().await {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        self.done = true;
                        return Some(Ok(page));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
            };
            for child in &dir.directories {
                let Some(d) = child.digest.as_ref().and_then(|d| parse_digest(d).ok()) else {
                    continue;
                };
                if self.seen.contains(&d) {
                    continue;
                }
                if self.seen.len() >= MAX_TREE_DIRECTORIES {
                    self.done = true;
                    return Some(Err(Status::resource_exhausted(format!(
                        "tree has more than {MAX_TREE_DIRECTORIES} directories"
                    ))));
                }
                self.seen.insert(d);
                self.queue.push_back(d);
            }
            if self.index < self.skip {
                self.index += 1;
                continue;
            }
            let len = dir.encoded_len();
            if !page.directories.is_empty()
                && (page.directories.len() >= self.page_size || bytes + len > self.page_bytes)
            {
                // Full: this directory opens the next page. Its children
                // are already queued, so it must not be walked again.
                page.next_page_token = self.index.to_string();
                self.next = Some(dir);
                return Some(Ok(page));
            }
            bytes += len;
            page.directories.push(dir);
            self.index += 1;
        }
    }

    /// The next present directory of the walk.
    async fn pop(&mut self) -> Result<Option<Directory>, Status> {
        while let Some(d) = self.queue.pop_front() {
            if let Some(dir) = self.svc.read_directory(self.ns, &d).await? {
                return Ok(Some(dir));
            }
        }
        Ok(None)
    }

    pub(crate) fn into_stream(self) -> BoxStream<GetTreeResponse> {
        Box::pin(futures_util::stream::unfold(self, |mut w| async move {
            let page = w.next_page().await?;
            Some((page, w))
        }))
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        req: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let r = this.find_missing(req.into_inner()).await;
        self.0
            .observe("unary", SERVICE, "FindMissingBlobs", start, &r);
        r
    }

    async fn batch_update_blobs(
        &self,
        req: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let r = this.batch_update(req.into_inner()).await;
        self.0
            .observe("unary", SERVICE, "BatchUpdateBlobs", start, &r);
        r
    }

    async fn batch_read_blobs(
        &self,
        req: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let r = this.batch_read(req.into_inner()).await;
        self.0
            .observe("unary", SERVICE, "BatchReadBlobs", start, &r);
        r
    }

    type GetTreeStream = BoxStream<GetTreeResponse>;

    async fn get_tree(
        &self,
        req: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let start = Instant::now();
        let this = Self(self.0.for_request(&req));
        let req = req.into_inner();
        let hash = super::ac::digest_hash(req.root_digest.as_ref());
        let r = CasService::get_tree(&this, req).await;
        self.0
            .observe("server_stream", SERVICE, "GetTree", start, &r);
        self.0
            .log(|| format!("GRPC GETTREEREQUEST {hash} {}", super::ac::outcome(&r)));
        Ok(Response::new(r?.into_stream()))
    }
}

/// The whole stored file (a zstd stream), each frame verified as it is read.
fn read_stored(b: &mut hoard_disk::Blob) -> Result<Vec<u8>, hoard_disk::Error> {
    let mut all = Vec::with_capacity(b.stored_len() as usize);
    let mut piece = Vec::new();
    b.seek_stored(0);
    while b.next_stored(&mut piece)? {
        all.extend_from_slice(&piece);
    }
    Ok(all)
}

/// A BatchUpdateBlobs entry's digest and compressor.
fn parse_blob_request(
    digest: Option<&Digest>,
    comp: i32,
) -> Result<(crate::validate::BlobDigest, Encoding), CacheError> {
    let d = match digest.map(parse_digest) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return Err(e),
        None => return Err(CacheError::invalid("missing digest")),
    };
    let encoding = match compressor::Value::try_from(comp) {
        Ok(compressor::Value::Identity) => Encoding::Identity,
        Ok(compressor::Value::Zstd) => Encoding::Zstd,
        _ => {
            return Err(CacheError::invalid(format!(
                "unsupported compressor {comp} for {}/{}; use IDENTITY or ZSTD",
                d.hash, d.size
            )));
        }
    };
    Ok((d, encoding))
}
