use std::path::PathBuf;
use std::time::Duration;

/// Where the bucket is and how to sign requests (bazel-remote's
/// `s3_proxy.*` settings).
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `host:port` (scheme from `disable_ssl`) or a full `http(s)://` URL.
    pub endpoint: String,
    pub bucket: String,
    /// Key prefix; empty for none.
    pub prefix: String,
    pub region: String,
    pub credentials: CredentialSource,
    pub disable_ssl: bool,
    /// Path-style addressing (`bucket_lookup_type: path`), needed by most
    /// self-hosted servers.
    pub path_style: bool,
}

/// Where the S3 credentials come from (bazel-remote's `s3_proxy.auth_method`,
/// plus the SDK's default chain). Every source but static keys is one of
/// `aws-config`'s providers, which also refresh expiring credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// `access_key`: static keys from the configuration.
    AccessKey {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    /// `iam_role`: the instance metadata service (IMDSv2), at `endpoint`
    /// (`s3_proxy.iam_role_endpoint`) or the SDK's default address.
    IamRole { endpoint: Option<String> },
    /// `aws_credentials_file`: a profile (`s3_proxy.aws_profile`) of a
    /// shared credentials file (`s3_proxy.aws_shared_credentials_file`, or
    /// the SDK's default `~/.aws/credentials`).
    CredentialsFile {
        profile: String,
        file: Option<PathBuf>,
    },
    /// `default`: the SDK's chain (environment, profile files, web
    /// identity, ECS, instance metadata).
    DefaultChain,
}

impl S3Config {
    pub fn endpoint_url(&self) -> String {
        if self.endpoint.contains("://") {
            self.endpoint.clone()
        } else if self.disable_ssl {
            format!("http://{}", self.endpoint)
        } else {
            format!("https://{}", self.endpoint)
        }
    }
}

/// How the uploader behaves.
#[derive(Clone, Debug)]
pub struct UploadConfig {
    /// Worker threads draining the queue; 0 makes the bucket read-only.
    pub num_uploaders: usize,
    /// Queue capacity; a job arriving at a full queue ends as `dropped`.
    pub max_queued_uploads: usize,
    /// Blobs larger than this are neither uploaded nor fetched.
    pub max_proxy_blob_size: u64,
    /// Blobs of at least this many stored bytes use multipart upload.
    pub multipart_threshold: u64,
    pub part_size: u64,
    /// Attempts per upload for transient failures (timeouts, 5xx, 409
    /// conditional conflicts) before the job ends as `error`.
    pub max_attempts: u32,
    /// Upper bound on a read-through or existence check; past it the
    /// request is answered as a local miss.
    pub read_timeout: Duration,
    /// How long a "this blob is in the bucket" fact is trusted.
    pub existence_ttl: Duration,
    /// How long FindMissingBlobs trusts "the bucket has no such blob"
    /// (zero: it always asks).
    pub absence_ttl: Duration,
    pub existence_capacity: usize,
    /// On shutdown, how long queued uploads may still run; the rest stay in
    /// the journal for the next start.
    pub drain_timeout: Duration,
    /// Background backfill: blobs with no successful upload recorded
    /// (errors, drops, an adopted directory) are uploaded at this many per
    /// second; 0 turns it off.
    pub backfill_rate: u32,
    /// File recording queued jobs (survives restarts and `kill -9`).
    pub journal_path: PathBuf,
    /// Names this host in object metadata, to recognise its own creations.
    pub host_id: String,
}
