//! The table of every setting hoard reads: its YAML key, its flag, its
//! environment variables and its help text. `--help` and the README's
//! configuration reference are written from this one table.

/// How a setting's value is spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Str,
    Int,
    Bool,
    Duration,
    List,
}

pub struct Setting {
    /// YAML key; nested keys are dotted (`namespaces.default`).
    pub key: &'static str,
    /// Command-line flag without the leading `--` (bazel-remote's name).
    pub flag: &'static str,
    /// Environment variables, lowest precedence first.
    pub env: &'static [&'static str],
    pub ty: Ty,
    pub default: &'static str,
    pub help: &'static str,
}

macro_rules! s {
    ($key:literal, $flag:literal, [$($env:literal),*], $ty:ident, $default:literal, $help:literal) => {
        Setting { key: $key, flag: $flag, env: &[$($env),*], ty: Ty::$ty, default: $default, help: $help }
    };
}

pub const SETTINGS: &[Setting] = &[
    s!(
        "config_file",
        "config_file",
        ["BAZEL_REMOTE_CONFIG_FILE", "HOARD_CONFIG_FILE"],
        Str,
        "",
        "YAML file to read first; environment variables and flags override it"
    ),
    s!(
        "dir",
        "dir",
        ["BAZEL_REMOTE_DIR", "HOARD_DIR"],
        Str,
        "hoard-data",
        "cache directory (bazel-remote layout; an existing bazel-remote directory works)"
    ),
    s!(
        "max_size",
        "max_size",
        ["BAZEL_REMOTE_MAX_SIZE", "HOARD_MAX_SIZE"],
        Int,
        "10",
        "size limit of the disk cache in GiB (stored size, 4 KiB blocks, AC and CAS together)"
    ),
    s!(
        "max_size_hard_limit",
        "max_size_hard_limit",
        [
            "BAZEL_REMOTE_MAX_SIZE_HARD_LIMIT",
            "HOARD_MAX_SIZE_HARD_LIMIT"
        ],
        Int,
        "0",
        "refuse uploads with 507 when they would take the cache past this many GiB (0: off)"
    ),
    s!(
        "storage_mode",
        "storage_mode",
        ["BAZEL_REMOTE_STORAGE_MODE", "HOARD_STORAGE_MODE"],
        Str,
        "zstd",
        "how CAS blobs are stored: zstd or uncompressed"
    ),
    s!(
        "http_address",
        "http_address",
        ["BAZEL_REMOTE_HTTP_ADDRESS", "HOARD_HTTP_ADDRESS"],
        Str,
        ":8080",
        "HTTP listen address, [host]:port"
    ),
    s!(
        "grpc_address",
        "grpc_address",
        ["BAZEL_REMOTE_GRPC_ADDRESS", "HOARD_GRPC_ADDRESS"],
        Str,
        ":9092",
        "gRPC listen address, [host]:port; none: HTTP only"
    ),
    s!(
        "max_blob_size",
        "max_blob_size",
        ["BAZEL_REMOTE_MAX_BLOB_SIZE", "HOARD_MAX_BLOB_SIZE"],
        Int,
        "9223372036854775807",
        "largest blob accepted, in bytes (uncompressed size)"
    ),
    s!(
        "max_inflight_bytes",
        "max_inflight_bytes",
        ["HOARD_MAX_INFLIGHT_BYTES"],
        Int,
        "268435456",
        "request and response body bytes held in memory at once; requests wait beyond it"
    ),
    s!(
        "htpasswd_file",
        "htpasswd_file",
        ["BAZEL_REMOTE_HTPASSWD_FILE", "HOARD_HTPASSWD_FILE"],
        Str,
        "",
        "htpasswd file of bcrypt entries (htpasswd -B); when set, HTTP and gRPC requests need HTTP Basic credentials"
    ),
    s!(
        "allow_unauthenticated_reads",
        "allow_unauthenticated_reads",
        [
            "BAZEL_REMOTE_UNAUTHENTICATED_READS",
            "HOARD_ALLOW_UNAUTHENTICATED_READS"
        ],
        Bool,
        "false",
        "with htpasswd_file: reads need no credentials, writes still do"
    ),
    s!(
        "tls_cert_file",
        "tls_cert_file",
        ["BAZEL_REMOTE_TLS_CERT_FILE", "HOARD_TLS_CERT_FILE"],
        Str,
        "",
        "PEM certificate chain; with tls_key_file, both listeners serve TLS only (HTTPS, gRPC over TLS); reloaded on SIGHUP"
    ),
    s!(
        "tls_key_file",
        "tls_key_file",
        ["BAZEL_REMOTE_TLS_KEY_FILE", "HOARD_TLS_KEY_FILE"],
        Str,
        "",
        "PEM private key of tls_cert_file"
    ),
    s!(
        "tls_ca_file",
        "tls_ca_file",
        ["BAZEL_REMOTE_TLS_CA_FILE", "HOARD_TLS_CA_FILE"],
        Str,
        "",
        "PEM CA certificates; when set, clients must present a certificate signed by one of them (mTLS)"
    ),
    s!(
        "max_inflight_wait",
        "max_inflight_wait",
        ["HOARD_MAX_INFLIGHT_WAIT"],
        Duration,
        "10s",
        "how long a request waits for in-flight memory before it fails as busy (HTTP 503, gRPC UNAVAILABLE)"
    ),
    s!(
        "max_connections",
        "max_connections",
        ["HOARD_MAX_CONNECTIONS"],
        Int,
        "4096",
        "open client connections, HTTP and gRPC together (lowered to fit the file descriptor limit); more are closed at accept"
    ),
    s!(
        "listen_backlog",
        "listen_backlog",
        ["HOARD_LISTEN_BACKLOG"],
        Int,
        "0",
        "listen queue length of both listeners (0: the kernel's maximum, net.core.somaxconn)"
    ),
    s!(
        "request_header_timeout",
        "request_header_timeout",
        ["HOARD_REQUEST_HEADER_TIMEOUT"],
        Duration,
        "10s",
        "how long an HTTP client may take to send a request head"
    ),
    s!(
        "client_idle_timeout",
        "client_idle_timeout",
        ["HOARD_CLIENT_IDLE_TIMEOUT"],
        Duration,
        "60s",
        "a client that sends or reads nothing for this long while hoard waits on it loses its request and connection, and what they hold (0s: never)"
    ),
    s!(
        "hot_set_size",
        "hot_set_size",
        ["HOARD_HOT_SET_SIZE"],
        Int,
        "64",
        "MiB of memory for the content of small (up to 64 KiB), recently read CAS blobs, served without touching their files; 0: off"
    ),
    s!(
        "max_action_result_size",
        "max_action_result_size",
        ["HOARD_MAX_ACTION_RESULT_SIZE"],
        Int,
        "67108864",
        "largest ActionResult accepted, in bytes"
    ),
    s!(
        "fsync",
        "fsync",
        ["HOARD_FSYNC"],
        Bool,
        "true",
        "fsync every blob before it becomes visible"
    ),
    s!(
        "disable_http_ac_validation",
        "disable_http_ac_validation",
        [
            "BAZEL_REMOTE_DISABLE_HTTP_AC_VALIDATION",
            "HOARD_DISABLE_HTTP_AC_VALIDATION"
        ],
        Bool,
        "false",
        "store HTTP /ac/ bodies unvalidated in the raw keyspace, which gRPC never sees (for ccache and other non-Bazel clients)"
    ),
    s!(
        "access_log_level",
        "access_log_level",
        ["BAZEL_REMOTE_ACCESS_LOG_LEVEL", "HOARD_ACCESS_LOG_LEVEL"],
        Str,
        "all",
        "all: one stdout line per cache request; none: no access log"
    ),
    s!(
        "idle_timeout",
        "idle_timeout",
        ["BAZEL_REMOTE_IDLE_TIMEOUT", "HOARD_IDLE_TIMEOUT"],
        Duration,
        "0s",
        "exit after this long without cache requests (0s: never)"
    ),
    s!(
        "shutdown_timeout",
        "shutdown_timeout",
        ["HOARD_SHUTDOWN_TIMEOUT"],
        Duration,
        "30s",
        "on SIGTERM, how long in-flight requests may take to finish"
    ),
    s!(
        "s3_proxy.endpoint",
        "s3.endpoint",
        ["BAZEL_REMOTE_S3_ENDPOINT"],
        Str,
        "",
        "S3 endpoint, host:port (scheme from s3.disable_ssl) or a full URL"
    ),
    s!(
        "s3_proxy.bucket",
        "s3.bucket",
        ["BAZEL_REMOTE_S3_BUCKET"],
        Str,
        "",
        "bucket shared by all hosts; setting it turns the S3 tier on"
    ),
    s!(
        "s3_proxy.prefix",
        "s3.prefix",
        ["BAZEL_REMOTE_S3_PREFIX"],
        Str,
        "",
        "key prefix inside the bucket"
    ),
    s!(
        "s3_proxy.auth_method",
        "s3.auth_method",
        ["BAZEL_REMOTE_S3_AUTH_METHOD"],
        Str,
        "access_key",
        "access_key (static keys), iam_role (instance metadata), aws_credentials_file (a profile of a credentials file), default (the AWS SDK's chain)"
    ),
    s!(
        "s3_proxy.iam_role_endpoint",
        "s3.iam_role_endpoint",
        ["BAZEL_REMOTE_S3_IAM_ROLE_ENDPOINT"],
        Str,
        "",
        "instance metadata URL for auth_method iam_role (empty: the SDK's default)"
    ),
    s!(
        "s3_proxy.aws_profile",
        "s3.aws_profile",
        ["AWS_PROFILE", "BAZEL_REMOTE_S3_AWS_PROFILE"],
        Str,
        "default",
        "profile to read with auth_method aws_credentials_file"
    ),
    s!(
        "s3_proxy.aws_shared_credentials_file",
        "s3.aws_shared_credentials_file",
        [
            "AWS_SHARED_CREDENTIALS_FILE",
            "BAZEL_REMOTE_S3_AWS_SHARED_CREDENTIALS_FILE"
        ],
        Str,
        "",
        "credentials file for auth_method aws_credentials_file (empty: ~/.aws/credentials)"
    ),
    s!(
        "s3_proxy.access_key_id",
        "s3.access_key_id",
        ["BAZEL_REMOTE_S3_ACCESS_KEY_ID"],
        Str,
        "",
        "S3 access key id"
    ),
    s!(
        "s3_proxy.secret_access_key",
        "s3.secret_access_key",
        ["BAZEL_REMOTE_S3_SECRET_ACCESS_KEY"],
        Str,
        "",
        "S3 secret access key"
    ),
    s!(
        "s3_proxy.session_token",
        "s3.session_token",
        ["BAZEL_REMOTE_S3_SESSION_TOKEN"],
        Str,
        "",
        "S3 session token, if the credentials are temporary"
    ),
    s!(
        "s3_proxy.disable_ssl",
        "s3.disable_ssl",
        ["BAZEL_REMOTE_S3_DISABLE_SSL"],
        Bool,
        "false",
        "talk plain HTTP to the endpoint"
    ),
    s!(
        "s3_proxy.region",
        "s3.region",
        ["BAZEL_REMOTE_S3_REGION"],
        Str,
        "us-east-1",
        "region used for signing"
    ),
    s!(
        "s3_proxy.bucket_lookup_type",
        "s3.bucket_lookup_type",
        ["BAZEL_REMOTE_S3_BUCKET_LOOKUP_TYPE"],
        Str,
        "auto",
        "auto or path: path-style URLs; dns: virtual-host style"
    ),
    s!(
        "s3_proxy.read_timeout",
        "s3.read_timeout",
        ["HOARD_S3_READ_TIMEOUT"],
        Duration,
        "5s",
        "longest wait for the bucket on a request's behalf (read-through, existence check); then it is a miss"
    ),
    s!(
        "s3_proxy.existence_ttl",
        "s3.existence_ttl",
        ["HOARD_S3_EXISTENCE_TTL"],
        Duration,
        "10m",
        "how long a blob known to be in the bucket is trusted without asking again"
    ),
    s!(
        "s3_proxy.absence_ttl",
        "s3.absence_ttl",
        ["HOARD_S3_ABSENCE_TTL"],
        Duration,
        "30s",
        "how long FindMissingBlobs believes the bucket's \"no such blob\" without asking again (a wrong answer costs the client a re-upload, never a build); 0s: always ask"
    ),
    s!(
        "s3_proxy.multipart_threshold",
        "s3.multipart_threshold",
        ["HOARD_S3_MULTIPART_THRESHOLD"],
        Int,
        "67108864",
        "stored size from which uploads use multipart (bytes)"
    ),
    s!(
        "s3_proxy.part_size",
        "s3.part_size",
        ["HOARD_S3_PART_SIZE"],
        Int,
        "16777216",
        "multipart part size (bytes, at least 5 MiB)"
    ),
    s!(
        "s3_proxy.backfill",
        "s3.backfill",
        ["HOARD_S3_BACKFILL"],
        Bool,
        "false",
        "upload, in the background, blobs with no successful upload (after errors, drops, or an adopted bazel-remote directory)"
    ),
    s!(
        "s3_proxy.backfill_rate",
        "s3.backfill_rate",
        ["HOARD_S3_BACKFILL_RATE"],
        Int,
        "10",
        "backfill uploads started per second"
    ),
    s!(
        "num_uploaders",
        "num_uploaders",
        ["BAZEL_REMOTE_NUM_UPLOADERS", "HOARD_NUM_UPLOADERS"],
        Int,
        "100",
        "concurrent uploads to the bucket; 0 makes the bucket read-only"
    ),
    s!(
        "max_queued_uploads",
        "max_queued_uploads",
        [
            "BAZEL_REMOTE_MAX_QUEUED_UPLOADS",
            "HOARD_MAX_QUEUED_UPLOADS"
        ],
        Int,
        "1000000",
        "upload queue capacity; a blob arriving at a full queue is counted as dropped"
    ),
    s!(
        "max_proxy_blob_size",
        "max_proxy_blob_size",
        [
            "BAZEL_REMOTE_MAX_PROXY_BLOB_SIZE",
            "HOARD_MAX_PROXY_BLOB_SIZE"
        ],
        Int,
        "9223372036854775807",
        "blobs larger than this are neither uploaded nor fetched"
    ),
    s!(
        "upload_drain_timeout",
        "upload_drain_timeout",
        ["HOARD_UPLOAD_DRAIN_TIMEOUT"],
        Duration,
        "30s",
        "on SIGTERM, how long queued uploads may still run; the rest wait in the journal"
    ),
    s!(
        "host_id",
        "host_id",
        ["HOARD_HOST_ID"],
        Str,
        "",
        "this host's name in object metadata (default: the hostname)"
    ),
    s!(
        "accounting.clickhouse_url",
        "accounting.clickhouse_url",
        ["HOARD_ACCOUNTING_CLICKHOUSE_URL"],
        Str,
        "",
        "ClickHouse HTTP URL for storage accounting, e.g. http://127.0.0.1:8123; empty: accounting off"
    ),
    s!(
        "accounting.database",
        "accounting.database",
        ["HOARD_ACCOUNTING_DATABASE"],
        Str,
        "default",
        "ClickHouse database"
    ),
    s!(
        "accounting.table",
        "accounting.table",
        ["HOARD_ACCOUNTING_TABLE"],
        Str,
        "remote_build_cache_operations",
        "ClickHouse table (deploy/clickhouse/schema.sql)"
    ),
    s!(
        "accounting.user",
        "accounting.user",
        ["HOARD_ACCOUNTING_USER"],
        Str,
        "default",
        "ClickHouse user"
    ),
    s!(
        "accounting.password",
        "accounting.password",
        ["HOARD_ACCOUNTING_PASSWORD"],
        Str,
        "",
        "ClickHouse password"
    ),
    s!(
        "accounting.flush_interval",
        "accounting.flush_interval",
        ["HOARD_ACCOUNTING_FLUSH_INTERVAL"],
        Duration,
        "60s",
        "how often closed minutes are sent"
    ),
    s!(
        "accounting.spool_dir",
        "accounting.spool_dir",
        ["HOARD_ACCOUNTING_SPOOL_DIR"],
        Str,
        "",
        "where batches wait for ClickHouse (default: <dir>/accounting.spool)"
    ),
    s!(
        "accounting.spool_max_bytes",
        "accounting.spool_max_bytes",
        ["HOARD_ACCOUNTING_SPOOL_MAX_BYTES"],
        Int,
        "1073741824",
        "spool bound; a batch beyond it is dropped and counted"
    ),
    s!(
        "drift.threshold_percent",
        "drift.threshold_percent",
        ["HOARD_DRIFT_THRESHOLD_PERCENT"],
        Int,
        "10",
        "hoard drift exits 1 when a namespace drifts by more than this many percent"
    ),
    s!(
        "drift.interval",
        "drift.interval",
        ["HOARD_DRIFT_INTERVAL"],
        Duration,
        "0s",
        "how often the daemon compares bucket and reported footprint for the drift metrics (0s: never)"
    ),
    s!(
        "namespaces.default",
        "namespaces.default",
        ["HOARD_NAMESPACES_DEFAULT"],
        Str,
        "",
        "namespace for requests that name no instance (empty: bazel-remote's layout)"
    ),
    s!(
        "namespaces.allowed",
        "namespaces.allowed",
        ["HOARD_NAMESPACES_ALLOWED"],
        List,
        "",
        "comma-separated instance names to serve; empty serves any valid name"
    ),
    s!(
        "namespaces.max",
        "namespaces.max",
        ["HOARD_NAMESPACES_MAX"],
        Int,
        "1024",
        "most namespaces the cache will create (at most 2048)"
    ),
    s!(
        "namespaces.max_size",
        "namespaces.max_size",
        ["HOARD_NAMESPACES_MAX_SIZE"],
        Str,
        "",
        "quota of every namespace in GiB (fractions allowed, e.g. 0.5): a namespace over it evicts its own entries, those used longest ago first, never another's; empty: none (max_size still holds for all)"
    ),
    s!(
        "namespaces.max_size_overrides",
        "namespaces.max_size_overrides",
        ["HOARD_NAMESPACES_MAX_SIZE_OVERRIDES"],
        List,
        "",
        "per-namespace quotas in GiB that replace namespaces.max_size: a YAML mapping (team-a: 50), or name=GiB,... in a flag or the environment"
    ),
    s!(
        "namespaces.instance_names",
        "namespaces.instance_names",
        ["HOARD_NAMESPACES_INSTANCE_NAMES"],
        Str,
        "isolate",
        "what an instance name (gRPC instance_name, HTTP path prefix) selects: isolate (its own AC and CAS), mangle_ac (its own AC, one shared CAS: bazel-remote's enable_ac_key_instance_mangling), ignore (bazel-remote's default: one cache for all)"
    ),
    s!(
        "enable_ac_key_instance_mangling",
        "enable_ac_key_instance_mangling",
        ["BAZEL_REMOTE_ENABLE_AC_KEY_INSTANCE_MANGLING"],
        Bool,
        "false",
        "bazel-remote's name for namespaces.instance_names: mangle_ac (true sets it; it may not contradict namespaces.instance_names)"
    ),
    s!(
        "namespaces.bind_to_identity",
        "namespaces.bind_to_identity",
        ["HOARD_NAMESPACES_BIND_TO_IDENTITY"],
        Bool,
        "false",
        "with htpasswd_file: an authenticated client's namespace is its user name, and naming another is refused (403, PERMISSION_DENIED); unauthenticated reads see the default namespace only"
    ),
];

/// bazel-remote settings hoard does not implement yet. Setting one is an
/// error rather than being silently ignored, because ignoring, say, an
/// htpasswd file would leave a cache open that its operator thinks is closed.
pub const UNSUPPORTED: &[&str] = &[
    "ldap",
    "gcs_proxy",
    "http_proxy",
    "grpc_proxy",
    "azblob_proxy",
    "s3_proxy.signature_type",
    "experimental_remote_asset_api",
];

/// bazel-remote settings accepted for compatibility that change nothing.
pub const IGNORED: &[&str] = &[
    "zstd_implementation",
    "enable_endpoint_metrics",
    "endpoint_metrics_duration_buckets",
    "http_metrics_prefix",
    "log_timezone",
    "disable_grpc_ac_deps_check",
    "profile_address",
    "s3_proxy.update_timestamps",
    "s3_proxy.key_version",
    "s3_proxy.max_idle_conns",
    "http_read_timeout",
    "http_write_timeout",
];

pub fn find_by_key(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

pub fn find_by_flag(flag: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.flag == flag)
}

/// The `--help` text.
pub fn help() -> String {
    let mut out = String::from(
        "hoard: a Bazel remote cache (HTTP and gRPC, disk cache, S3 write-behind)\n\n\
         usage: hoard [--flag=value ...]          serve\n\
         \x20      hoard drift [--flag=value ...]    compare the bucket with the reported footprint\n\n\
         Settings merge in this order: YAML file (--config_file), then environment\n\
         variables, then flags. Each setting:\n\n",
    );
    for s in SETTINGS {
        out.push_str(&format!(
            "  --{:<24} {}\n  {:<26} yaml: {}; env: {}; default: {:?}\n",
            s.flag,
            s.help,
            "",
            s.key,
            s.env.join(", "),
            s.default
        ));
    }
    out
}
