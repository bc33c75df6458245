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
        "none",
        "gRPC listen address; only `none` is accepted until the gRPC front end ships"
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
];

/// bazel-remote settings hoard does not implement yet. Setting one is an
/// error rather than being silently ignored, because ignoring, say, an
/// htpasswd file would leave a cache open that its operator thinks is closed.
pub const UNSUPPORTED: &[&str] = &[
    "htpasswd_file",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "allow_unauthenticated_reads",
    "ldap",
    "gcs_proxy",
    "http_proxy",
    "grpc_proxy",
    "azblob_proxy",
    "s3_proxy",
    "disable_http_ac_validation",
    "enable_ac_key_instance_mangling",
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
        "hoard: a Bazel remote cache (HTTP and gRPC, disk LRU)\n\n\
         usage: hoard [--flag=value ...]\n\n\
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
