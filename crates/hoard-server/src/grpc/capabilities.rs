//! Capabilities: what this server supports, with the limits it enforces.

use std::time::Instant;

use hoard_proto::reapi::capabilities_server::Capabilities;
use hoard_proto::reapi::priority_capabilities::PriorityRange;
use hoard_proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, GetCapabilitiesRequest, PriorityCapabilities,
    ServerCapabilities, compressor, digest_function, symlink_absolute_path_strategy,
};
use tonic::{Request, Response, Status};

use super::{Shared, semver};

pub(crate) struct CapabilitiesService(pub Shared);

const SERVICE: &str = "build.bazel.remote.execution.v2.Capabilities";

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        req: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let start = Instant::now();
        let r = self
            .0
            .namespace_for_read(&req.get_ref().instance_name, None)
            .await
            .map(|_| {
                let zstd = vec![compressor::Value::Zstd as i32];
                Response::new(ServerCapabilities {
                    cache_capabilities: Some(CacheCapabilities {
                        digest_functions: vec![digest_function::Value::Sha256 as i32],
                        action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                            update_enabled: true,
                        }),
                        cache_priority_capabilities: Some(PriorityCapabilities {
                            priorities: vec![PriorityRange {
                                min_priority: 0,
                                max_priority: 0,
                            }],
                        }),
                        max_batch_total_size_bytes: self.0.max_batch as i64,
                        symlink_absolute_path_strategy:
                            symlink_absolute_path_strategy::Value::Allowed as i32,
                        supported_compressors: zstd.clone(),
                        supported_batch_update_compressors: zstd,
                        max_cas_blob_size_bytes: self
                            .0
                            .cache
                            .limits()
                            .max_blob_size
                            .min(i64::MAX as u64)
                            as i64,
                        split_blob_support: false,
                        splice_blob_support: false,
                    }),
                    deprecated_api_version: Some(semver(2, 0)),
                    low_api_version: Some(semver(2, 0)),
                    high_api_version: Some(semver(2, 3)),
                })
            });
        self.0
            .observe("unary", SERVICE, "GetCapabilities", start, &r);
        r
    }
}
