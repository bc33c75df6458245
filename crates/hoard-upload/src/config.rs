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
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub disable_ssl: bool,
    /// Path-style addressing (`bucket_lookup_type: path`), needed by most
    /// self-hosted servers.
    pub path_style: bool,
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
    pub existence_capacity: usize,
    /// On shutdown, how long queued uploads may still run; the rest stay in
    /// the journal for the next start.
    pub drain_timeout: Duration,
    /// File recording queued jobs (survives restarts and `kill -9`).
    pub journal_path: PathBuf,
    /// Names this host in object metadata, to recognise its own creations.
    pub host_id: String,
}
