//! Turning flags, environment variables and a YAML file into a validated
//! [`Config`] before anything is opened. Every error is one line naming the
//! setting, where its value came from, and what is wrong.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hoard_disk::StorageMode;
use hoard_server::{InstanceNames, NamespacePolicy};

use crate::settings::{self, IGNORED, SETTINGS, Setting, Ty, UNSUPPORTED};

const GIB: u64 = 1 << 30;

/// The daemon's validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub dir: PathBuf,
    pub max_size_bytes: u64,
    pub hard_limit_bytes: Option<u64>,
    pub storage_mode: StorageMode,
    pub http_address: SocketAddr,
    /// None when gRPC is disabled (`grpc_address: none`).
    pub grpc_address: Option<SocketAddr>,
    pub max_blob_size: u64,
    pub max_inflight_bytes: u64,
    pub max_inflight_wait: Duration,
    pub max_action_result_size: u64,
    pub hot_set_bytes: u64,
    pub max_connections: usize,
    /// None: the kernel's maximum.
    pub listen_backlog: Option<u32>,
    pub request_header_timeout: Duration,
    pub client_idle_timeout: Duration,
    /// The users of `htpasswd_file`; None: no authentication.
    pub htpasswd: Option<hoard_server::auth::Htpasswd>,
    pub allow_unauthenticated_reads: bool,
    /// TLS files, when `tls_cert_file` is set.
    pub tls: Option<hoard_server::tls::TlsFiles>,
    pub fsync: bool,
    /// HTTP `/ac/` entries go unvalidated to the raw keyspace.
    pub disable_http_ac_validation: bool,
    pub access_log: bool,
    pub idle_timeout: Option<Duration>,
    pub shutdown_timeout: Duration,
    pub namespaces: NamespacePolicy,
    pub max_namespaces: usize,
    pub quotas: hoard_disk::Quotas,
    /// The S3 tier, when `s3_proxy.bucket` is set.
    pub s3: Option<(hoard_upload::S3Config, hoard_upload::UploadConfig)>,
    /// Storage accounting, when `accounting.clickhouse_url` is set.
    pub accounting: Option<hoard_accounting::AccountingConfig>,
    pub drift_threshold_percent: u64,
    /// Periodic drift check in the daemon; None: off.
    pub drift_interval: Option<Duration>,
}

/// What the command line asked for.
pub enum Command {
    Serve(Box<Config>),
    Drift(Box<Config>),
    Help,
    Version,
}

/// A configuration error: one line.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// A raw value and where it came from, for error messages.
#[derive(Clone, Debug)]
struct Raw {
    value: String,
    source: String,
}

pub fn from_args_and_env(
    args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    let (drift, args) = match args.first().map(String::as_str) {
        Some("drift") => (true, &args[1..]),
        _ => (false, args),
    };
    let flags = match parse_flags(args)? {
        Some(f) => f,
        None => return Ok(Command::Help),
    };
    if flags.contains_key("version") {
        return Ok(Command::Version);
    }
    // An unsupported setting is refused from the environment too: a
    // BAZEL_REMOTE_HTPASSWD_FILE ignored would leave a cache open that its
    // operator believes closed.
    for key in UNSUPPORTED {
        for name in unsupported_env_names(key) {
            if env(&name).is_some_and(|v| !v.is_empty()) {
                return err(format!(
                    "{key}: not supported by this version of hoard (set by environment variable {name}); unset it"
                ));
            }
        }
    }
    let mut env_values = BTreeMap::new();
    for s in SETTINGS {
        for name in s.env {
            if let Some(v) = env(name) {
                env_values.insert(
                    s.key.to_string(),
                    Raw {
                        value: v,
                        source: format!("environment variable {name}"),
                    },
                );
            }
        }
    }
    let config_file = flags
        .get("config_file")
        .or_else(|| env_values.get("config_file"))
        .map(|r| r.value.clone());
    let mut merged = match config_file.filter(|f| !f.is_empty()) {
        Some(path) => read_yaml(&path)?,
        None => BTreeMap::new(),
    };
    merged.extend(env_values);
    merged.extend(flags);
    let cfg = Box::new(build(&merged)?);
    if drift {
        if cfg.s3.is_none() || cfg.accounting.is_none() {
            return err("hoard drift: needs s3_proxy.bucket and accounting.clickhouse_url");
        }
        return Ok(Command::Drift(cfg));
    }
    Ok(Command::Serve(cfg))
}

/// `--key=value`, `--key value`, or a bare `--bool_flag`. Returns None for
/// `--help`.
fn parse_flags(args: &[String]) -> Result<Option<BTreeMap<String, Raw>>, ConfigError> {
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "-h" || arg == "--help" || arg == "help" {
            return Ok(None);
        }
        if arg == "--version" || arg == "-V" {
            out.insert(
                "version".into(),
                Raw {
                    value: "true".into(),
                    source: "flag".into(),
                },
            );
            continue;
        }
        let Some(body) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return err(format!(
                "unexpected argument {arg:?}; flags look like --max_size=10"
            ));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let name = name.to_string();
        let setting = match settings::find_by_flag(&name) {
            Some(s) => s,
            None => {
                unsupported(&name)?;
                if IGNORED.iter().any(|k| name == *k) {
                    if inline.is_none() && args.get(i).is_some_and(|a| !a.starts_with('-')) {
                        i += 1;
                    }
                    continue;
                }
                return err(format!(
                    "unknown flag --{name}; run hoard --help for the list"
                ));
            }
        };
        let value = match inline {
            Some(v) => v,
            None if setting.ty == Ty::Bool && args.get(i).is_none_or(|a| a.starts_with('-')) => {
                "true".to_string()
            }
            None => match args.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => return err(format!("--{name}: missing value")),
            },
        };
        out.insert(
            setting.key.to_string(),
            Raw {
                value,
                source: format!("flag --{name}"),
            },
        );
    }
    Ok(Some(out))
}

/// The environment variables bazel-remote reads for a setting:
/// `BAZEL_REMOTE_<KEY>` (with `s3_proxy.` spelled `S3_`), and its few
/// irregular names.
fn unsupported_env_names(key: &str) -> Vec<String> {
    let base = key
        .replace("s3_proxy.", "s3.")
        .replace('.', "_")
        .to_uppercase();
    let mut names = vec![format!("BAZEL_REMOTE_{base}")];
    if key == "allow_unauthenticated_reads" {
        names.push("BAZEL_REMOTE_UNAUTHENTICATED_READS".into());
    }
    names
}

fn unsupported(key: &str) -> Result<(), ConfigError> {
    let top = key.split('.').next().unwrap_or(key);
    if UNSUPPORTED.contains(&top) || UNSUPPORTED.contains(&key) {
        return err(format!(
            "{key}: not supported by this version of hoard; remove it (it would otherwise be ignored)"
        ));
    }
    Ok(())
}

fn read_yaml(path: &str) -> Result<BTreeMap<String, Raw>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .or_else(|e| err(format!("config_file: cannot read {path}: {e}")))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .or_else(|e| err(format!("config_file {path}: not valid YAML: {e}")))?;
    let mut out = BTreeMap::new();
    match doc {
        serde_yaml::Value::Null => {}
        serde_yaml::Value::Mapping(m) => flatten(path, "", &m, &mut out)?,
        _ => {
            return err(format!(
                "config_file {path}: expected a mapping of settings"
            ));
        }
    }
    Ok(out)
}

fn flatten(
    path: &str,
    prefix: &str,
    m: &serde_yaml::Mapping,
    out: &mut BTreeMap<String, Raw>,
) -> Result<(), ConfigError> {
    for (k, v) in m {
        let Some(k) = k.as_str() else {
            return err(format!("config_file {path}: keys must be strings"));
        };
        let key = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        let source = format!("{key} in {path}");
        let value = match v {
            // A list setting may be a mapping of name to value
            // (`max_size_overrides: {team-a: 50}`), kept as name=value.
            serde_yaml::Value::Mapping(inner)
                if settings::find_by_key(&key).is_some_and(|s| s.ty == Ty::List) =>
            {
                inner
                    .iter()
                    .map(|(k, v)| Some(format!("{}={}", k.as_str()?, scalar(v)?)))
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.join(","))
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "{key}: expected a mapping of names to scalars ({source})"
                        ))
                    })?
            }
            serde_yaml::Value::Mapping(inner) => {
                unsupported(&key)?;
                flatten(path, &key, inner, out)?;
                continue;
            }
            serde_yaml::Value::Sequence(items) => items
                .iter()
                .map(scalar)
                .collect::<Option<Vec<_>>>()
                .map(|v| v.join(","))
                .ok_or_else(|| {
                    ConfigError(format!("{key}: list items must be scalars ({source})"))
                })?,
            serde_yaml::Value::Null => continue,
            other => scalar(other)
                .ok_or_else(|| ConfigError(format!("{key}: unsupported value ({source})")))?,
        };
        unsupported(&key)?;
        if settings::find_by_key(&key).is_none() {
            if IGNORED.iter().any(|i| key == *i) {
                continue;
            }
            return err(format!(
                "{key}: unknown setting ({source}); run hoard --help for the list"
            ));
        }
        out.insert(key, Raw { value, source });
    }
    Ok(())
}

fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

struct Values<'a> {
    merged: &'a BTreeMap<String, Raw>,
}

impl Values<'_> {
    fn raw(&self, key: &str) -> (String, String, &'static Setting) {
        let setting = settings::find_by_key(key).unwrap_or(&SETTINGS[0]);
        match self.merged.get(key) {
            Some(r) => (r.value.trim().to_string(), r.source.clone(), setting),
            None => (setting.default.to_string(), "default".to_string(), setting),
        }
    }

    fn string(&self, key: &str) -> String {
        self.raw(key).0
    }

    fn int(&self, key: &str) -> Result<u64, ConfigError> {
        let (v, src, _) = self.raw(key);
        v.parse::<u64>().or_else(|_| {
            err(format!(
                "{key}: expected a non-negative integer, got {v:?} ({src})"
            ))
        })
    }

    fn bool(&self, key: &str) -> Result<bool, ConfigError> {
        let (v, src, _) = self.raw(key);
        match v.as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => err(format!("{key}: expected true or false, got {v:?} ({src})")),
        }
    }

    fn duration(&self, key: &str) -> Result<Duration, ConfigError> {
        let (v, src, _) = self.raw(key);
        parse_duration(&v).ok_or_else(|| {
            ConfigError(format!(
                "{key}: expected a duration like 30s, 5m or 1h, got {v:?} ({src})"
            ))
        })
    }

    fn is_set(&self, key: &str) -> bool {
        self.merged.contains_key(key)
    }

    fn source(&self, key: &str) -> String {
        self.raw(key).1
    }
}

fn parse_duration(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn parse_address(key: &str, v: &str, src: &str) -> Result<SocketAddr, ConfigError> {
    let full = if v.starts_with(':') {
        format!("0.0.0.0{v}")
    } else {
        v.to_string()
    };
    full.parse::<SocketAddr>().or_else(|_| {
        err(format!(
            "{key}: expected [host]:port with an IP host, got {v:?} ({src})"
        ))
    })
}

fn accounting_config(
    v: &Values,
    dir: &std::path::Path,
    host: Option<String>,
) -> Result<Option<hoard_accounting::AccountingConfig>, ConfigError> {
    let url = v.string("accounting.clickhouse_url");
    if url.is_empty() {
        return Ok(None);
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return err(format!(
            "accounting.clickhouse_url: expected an http:// or https:// URL, got {url:?} ({})",
            v.source("accounting.clickhouse_url")
        ));
    }
    let Some(host) = host else {
        return err(
            "accounting.clickhouse_url: accounting counts upload outcomes; it needs s3_proxy.bucket set",
        );
    };
    let interval = v.duration("accounting.flush_interval")?;
    if interval.is_zero() {
        return err("accounting.flush_interval: must be more than 0s");
    }
    let spool = v.string("accounting.spool_dir");
    Ok(Some(hoard_accounting::AccountingConfig {
        clickhouse_url: url,
        database: v.string("accounting.database"),
        table: v.string("accounting.table"),
        user: v.string("accounting.user"),
        password: v.string("accounting.password"),
        flush_interval: interval,
        spool_dir: if spool.is_empty() {
            dir.join("accounting.spool")
        } else {
            PathBuf::from(spool)
        },
        spool_max_bytes: v.int("accounting.spool_max_bytes")?,
        host,
    }))
}

/// `s3_proxy.auth_method` and what each method needs.
fn s3_credentials(v: &Values) -> Result<hoard_upload::CredentialSource, ConfigError> {
    use hoard_upload::CredentialSource;
    let method = v.string("s3_proxy.auth_method");
    let src = v.source("s3_proxy.auth_method");
    Ok(match method.as_str() {
        "access_key" => {
            let (ak, sk) = (
                v.string("s3_proxy.access_key_id"),
                v.string("s3_proxy.secret_access_key"),
            );
            if ak.is_empty() || sk.is_empty() {
                return err(
                    "s3_proxy.access_key_id and s3_proxy.secret_access_key: both are required with auth_method access_key",
                );
            }
            let token = v.string("s3_proxy.session_token");
            CredentialSource::AccessKey {
                access_key_id: ak,
                secret_access_key: sk,
                session_token: (!token.is_empty()).then_some(token),
            }
        }
        "iam_role" => {
            let endpoint = v.string("s3_proxy.iam_role_endpoint");
            let is_url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !endpoint.is_empty() && !is_url {
                return err(format!(
                    "s3_proxy.iam_role_endpoint: expected an http:// or https:// URL, got {endpoint:?} ({})",
                    v.source("s3_proxy.iam_role_endpoint")
                ));
            }
            CredentialSource::IamRole {
                endpoint: (!endpoint.is_empty()).then_some(endpoint),
            }
        }
        "aws_credentials_file" => {
            let file = v.string("s3_proxy.aws_shared_credentials_file");
            CredentialSource::CredentialsFile {
                profile: v.string("s3_proxy.aws_profile"),
                file: (!file.is_empty()).then(|| PathBuf::from(file)),
            }
        }
        "default" => CredentialSource::DefaultChain,
        other => {
            return err(format!(
                "s3_proxy.auth_method: expected access_key, iam_role, aws_credentials_file or default, got {other:?} ({src})"
            ));
        }
    })
}

fn s3_config(
    v: &Values,
    dir: &std::path::Path,
) -> Result<Option<(hoard_upload::S3Config, hoard_upload::UploadConfig)>, ConfigError> {
    let bucket = v.string("s3_proxy.bucket");
    if bucket.is_empty() {
        return Ok(None);
    }
    let endpoint = v.string("s3_proxy.endpoint");
    if endpoint.is_empty() {
        return err(format!(
            "s3_proxy.endpoint: required when s3_proxy.bucket is set ({})",
            v.source("s3_proxy.bucket")
        ));
    }
    let credentials = s3_credentials(v)?;
    let path_style = match v.string("s3_proxy.bucket_lookup_type").as_str() {
        "auto" | "path" => true,
        "dns" => false,
        other => {
            return err(format!(
                "s3_proxy.bucket_lookup_type: expected auto, path or dns, got {other:?} ({})",
                v.source("s3_proxy.bucket_lookup_type")
            ));
        }
    };
    let part_size = v.int("s3_proxy.part_size")?;
    if part_size < 5 << 20 {
        return err(format!(
            "s3_proxy.part_size: S3 parts are at least 5 MiB (5242880), got {part_size}"
        ));
    }
    let host_id = match v.string("host_id") {
        h if !h.is_empty() => h,
        _ => std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "hoard".into()),
    };
    if !host_id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return err(format!(
            "host_id: {host_id:?} must be letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(Some((
        hoard_upload::S3Config {
            endpoint,
            bucket,
            prefix: v.string("s3_proxy.prefix"),
            region: v.string("s3_proxy.region"),
            credentials,
            disable_ssl: v.bool("s3_proxy.disable_ssl")?,
            path_style,
        },
        hoard_upload::UploadConfig {
            num_uploaders: v.int("num_uploaders")? as usize,
            max_queued_uploads: v.int("max_queued_uploads")?.max(1) as usize,
            max_proxy_blob_size: v.int("max_proxy_blob_size")?,
            multipart_threshold: v.int("s3_proxy.multipart_threshold")?.max(part_size),
            part_size,
            max_attempts: 5,
            read_timeout: v.duration("s3_proxy.read_timeout")?,
            existence_ttl: v.duration("s3_proxy.existence_ttl")?,
            absence_ttl: v.duration("s3_proxy.absence_ttl")?,
            existence_capacity: 1_000_000,
            drain_timeout: v.duration("upload_drain_timeout")?,
            backfill_rate: if v.bool("s3_proxy.backfill")? {
                v.int("s3_proxy.backfill_rate")?.clamp(1, 100_000) as u32
            } else {
                0
            },
            journal_path: dir.join("upload.journal"),
            host_id,
        },
    )))
}

fn build(m: &BTreeMap<String, Raw>) -> Result<Config, ConfigError> {
    let v = Values { merged: m };
    let max_size = v.int("max_size")?;
    if max_size == 0 {
        return err(format!(
            "max_size: must be at least 1 (GiB) ({})",
            v.source("max_size")
        ));
    }
    let hard = v.int("max_size_hard_limit")?;
    if hard != 0 && hard < max_size {
        return err(format!(
            "max_size_hard_limit: {hard} GiB is below max_size {max_size} GiB ({})",
            v.source("max_size_hard_limit")
        ));
    }
    let storage_mode = match v.string("storage_mode").as_str() {
        "zstd" => StorageMode::Zstd,
        "uncompressed" => StorageMode::Uncompressed,
        other => {
            return err(format!(
                "storage_mode: expected zstd or uncompressed, got {other:?} ({})",
                v.source("storage_mode")
            ));
        }
    };
    let grpc = v.string("grpc_address");
    let grpc_address = match grpc.as_str() {
        "" | "none" => None,
        addr => Some(parse_address(
            "grpc_address",
            addr,
            &v.source("grpc_address"),
        )?),
    };
    if let Some(g) = grpc_address {
        let http = parse_address(
            "http_address",
            &v.string("http_address"),
            &v.source("http_address"),
        )?;
        if g.port() != 0 && g == http {
            return err(format!(
                "grpc_address: {g} is also http_address; give each its own port"
            ));
        }
    }
    let access_log = match v.string("access_log_level").as_str() {
        "all" => true,
        "none" => false,
        other => {
            return err(format!(
                "access_log_level: expected all or none, got {other:?} ({})",
                v.source("access_log_level")
            ));
        }
    };
    let dir = v.string("dir");
    if dir.is_empty() {
        return err("dir: must not be empty");
    }
    let default_ns = v.string("namespaces.default");
    if !default_ns.is_empty() {
        hoard_disk::validate_namespace(&default_ns)
            .or_else(|e| err(format!("namespaces.default: {e}")))?;
    }
    let allowed_raw = v.string("namespaces.allowed");
    let allowed: HashSet<String> = allowed_raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    for name in &allowed {
        hoard_disk::validate_namespace(name)
            .or_else(|e| err(format!("namespaces.allowed: {e}")))?;
    }
    let max_ns = v.int("namespaces.max")?;
    if !(1..=2048).contains(&max_ns) {
        return err(format!("namespaces.max: expected 1 to 2048, got {max_ns}"));
    }
    let quotas = quotas(&v)?;
    let instance_names = instance_names(&v)?;
    if instance_names != InstanceNames::Isolate && !allowed.is_empty() {
        return err(format!(
            "namespaces.allowed ({}) lists instance names, but namespaces.instance_names is not isolate: instance names select no namespace; remove one",
            v.source("namespaces.allowed")
        ));
    }
    let inflight = v.int("max_inflight_bytes")?;
    if inflight < 1 << 20 {
        return err(format!(
            "max_inflight_bytes: must be at least 1048576, got {inflight}"
        ));
    }
    let idle = v.duration("idle_timeout")?;
    let http = v.string("http_address");
    let dir = PathBuf::from(dir);
    let s3 = s3_config(&v, &dir)?;
    let accounting = accounting_config(&v, &dir, s3.as_ref().map(|(_, u)| u.host_id.clone()))?;
    let drift_interval = v.duration("drift.interval")?;
    Ok(Config {
        drift_threshold_percent: v.int("drift.threshold_percent")?,
        drift_interval: (!drift_interval.is_zero()).then_some(drift_interval),
        s3,
        accounting,
        dir,
        max_size_bytes: max_size.saturating_mul(GIB),
        hard_limit_bytes: (hard > 0).then(|| hard.saturating_mul(GIB)),
        storage_mode,
        http_address: parse_address("http_address", &http, &v.source("http_address"))?,
        grpc_address,
        max_blob_size: v.int("max_blob_size")?,
        max_inflight_bytes: inflight,
        max_inflight_wait: v.duration("max_inflight_wait")?,
        max_action_result_size: v.int("max_action_result_size")?,
        hot_set_bytes: v.int("hot_set_size")?.saturating_mul(1 << 20),
        max_connections: match v.int("max_connections")? {
            0 => return err("max_connections: must be at least 1"),
            n => n.min(1 << 20) as usize,
        },
        listen_backlog: match v.int("listen_backlog")? {
            0 => None,
            n => Some(n.min(u32::MAX as u64) as u32),
        },
        request_header_timeout: match v.duration("request_header_timeout")? {
            d if d.is_zero() => return err("request_header_timeout: must be above 0s"),
            d => d,
        },
        client_idle_timeout: v.duration("client_idle_timeout")?,
        htpasswd: htpasswd(&v)?,
        allow_unauthenticated_reads: v.bool("allow_unauthenticated_reads")?,
        tls: tls_files(&v)?,
        fsync: v.bool("fsync")?,
        disable_http_ac_validation: v.bool("disable_http_ac_validation")?,
        access_log,
        idle_timeout: (!idle.is_zero()).then_some(idle),
        shutdown_timeout: v.duration("shutdown_timeout")?,
        namespaces: NamespacePolicy {
            default: default_ns,
            allowed: (!allowed.is_empty()).then_some(allowed),
            bind_to_identity: bind_to_identity(&v)?,
            instance_names,
        },
        max_namespaces: max_ns as usize,
        quotas,
    })
}

/// A size in GiB, fractions allowed, as bytes.
fn gib(key: &str, value: &str, source: &str) -> Result<u64, ConfigError> {
    match value.trim().parse::<f64>() {
        Ok(g) if g > 0.0 && g.is_finite() => Ok((g * GIB as f64) as u64),
        _ => err(format!(
            "{key}: expected a size in GiB above 0 (like 50 or 0.5), got {value:?} ({source})"
        )),
    }
}

/// `namespaces.max_size` and its per-name overrides.
fn quotas(v: &Values<'_>) -> Result<hoard_disk::Quotas, ConfigError> {
    let key = "namespaces.max_size";
    let raw = v.string(key);
    let default = match raw.trim() {
        "" => None,
        g => Some(gib(key, g, &v.source(key))?),
    };
    let key = "namespaces.max_size_overrides";
    let mut by_name = HashMap::new();
    for item in v
        .string(key)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let Some((name, size)) = item.split_once('=') else {
            return err(format!(
                "{key}: expected name=GiB, got {item:?} ({})",
                v.source(key)
            ));
        };
        let name = name.trim();
        hoard_disk::validate_namespace(name)
            .or_else(|e| err(format!("{key}: {e} ({})", v.source(key))))?;
        by_name.insert(name.to_string(), gib(key, size, &v.source(key))?);
    }
    Ok(hoard_disk::Quotas { default, by_name })
}

/// `namespaces.instance_names`, or bazel-remote's
/// `enable_ac_key_instance_mangling`, which may only agree with it.
fn instance_names(v: &Values<'_>) -> Result<InstanceNames, ConfigError> {
    let key = "namespaces.instance_names";
    let mode = match v.string(key).as_str() {
        "isolate" => InstanceNames::Isolate,
        "mangle_ac" => InstanceNames::MangleAc,
        "ignore" => InstanceNames::Ignore,
        other => {
            return err(format!(
                "{key}: expected isolate, mangle_ac or ignore, got {other:?} ({})",
                v.source(key)
            ));
        }
    };
    if v.bool("enable_ac_key_instance_mangling")? {
        if v.is_set(key) && mode != InstanceNames::MangleAc {
            return err(format!(
                "enable_ac_key_instance_mangling ({}) means namespaces.instance_names: mangle_ac, but {key} is {:?} ({}); set one of them",
                v.source("enable_ac_key_instance_mangling"),
                v.string(key),
                v.source(key)
            ));
        }
        return Ok(InstanceNames::MangleAc);
    }
    Ok(mode)
}

/// The TLS settings, checked for consistency (the files are read at
/// start).
fn tls_files(v: &Values<'_>) -> Result<Option<hoard_server::tls::TlsFiles>, ConfigError> {
    let (cert, key, ca) = (
        v.string("tls_cert_file"),
        v.string("tls_key_file"),
        v.string("tls_ca_file"),
    );
    match (cert.is_empty(), key.is_empty()) {
        (true, true) if ca.is_empty() => Ok(None),
        (true, true) => err(format!(
            "tls_ca_file is set ({}) but tls_cert_file and tls_key_file are not: client certificates need TLS",
            v.source("tls_ca_file")
        )),
        (false, true) | (true, false) => {
            err("tls_cert_file and tls_key_file go together: set both, or neither".to_string())
        }
        (false, false) => Ok(Some(hoard_server::tls::TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            ca: (!ca.is_empty()).then(|| PathBuf::from(ca)),
        })),
    }
}

/// `namespaces.bind_to_identity`: needs identities, each a valid
/// namespace name.
fn bind_to_identity(v: &Values<'_>) -> Result<bool, ConfigError> {
    if !v.bool("namespaces.bind_to_identity")? {
        return Ok(false);
    }
    let Some(h) = htpasswd(v)? else {
        // Without htpasswd users, client certificates are the identities.
        if !v.string("tls_ca_file").is_empty() {
            return Ok(true);
        }
        return err(format!(
            "namespaces.bind_to_identity is set ({}) but neither htpasswd_file nor tls_ca_file is: there are no identities to bind",
            v.source("namespaces.bind_to_identity")
        ));
    };
    for user in h.users() {
        if let Err(e) = hoard_disk::validate_namespace(user) {
            return err(format!(
                "namespaces.bind_to_identity: htpasswd user {user:?} cannot name a namespace: {e}"
            ));
        }
    }
    Ok(true)
}

/// Reads and checks `htpasswd_file`, if set.
fn htpasswd(v: &Values<'_>) -> Result<Option<hoard_server::auth::Htpasswd>, ConfigError> {
    let path = v.string("htpasswd_file");
    if path.is_empty() {
        if v.bool("allow_unauthenticated_reads")? {
            return err(format!(
                "allow_unauthenticated_reads is set ({}) but htpasswd_file is not: there is nothing to allow reads without",
                v.source("allow_unauthenticated_reads")
            ));
        }
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).or_else(|e| {
        err(format!(
            "htpasswd_file: cannot read {path} ({}): {e}",
            v.source("htpasswd_file")
        ))
    })?;
    hoard_server::auth::Htpasswd::parse(&text)
        .map(Some)
        .or_else(|e| err(format!("htpasswd_file {path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match from_args_and_env(&args, &lookup)? {
            Command::Serve(c) => Ok(*c),
            _ => panic!("not a serve command"),
        }
    }

    #[test]
    fn quotas_and_instance_names_from_every_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hoard.yaml");
        std::fs::write(
            &file,
            "namespaces:\n  max_size: 0.5\n  max_size_overrides:\n    big: 2\n    small: 0.25\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = load(&["--config_file", f], &[]).unwrap();
        assert_eq!(c.quotas.default, Some(GIB / 2));
        assert_eq!(c.quotas.of("big"), Some(2 * GIB));
        assert_eq!(c.quotas.of("small"), Some(GIB / 4));
        assert_eq!(c.quotas.of("other"), Some(GIB / 2));
        let c = load(
            &["--namespaces.max_size_overrides=a=1,b=3"],
            &[("HOARD_NAMESPACES_MAX_SIZE", "7")],
        )
        .unwrap();
        assert_eq!(c.quotas.of("b"), Some(3 * GIB));
        assert_eq!(c.quotas.of("z"), Some(7 * GIB));
        assert_eq!(load(&[], &[]).unwrap().quotas.of("x"), None);
        for bad in [
            "--namespaces.max_size=0",
            "--namespaces.max_size=lots",
            "--namespaces.max_size_overrides=a",
            "--namespaces.max_size_overrides=../x=1",
            "--namespaces.instance_names=maybe",
        ] {
            let e = load(&[bad], &[]).unwrap_err().to_string();
            assert!(e.contains(": namespaces."), "{bad}: {e}");
        }
        use hoard_server::InstanceNames;
        let mode = |args: &[&str], env: &[(&str, &str)]| {
            load(args, env).map(|c| c.namespaces.instance_names)
        };
        assert_eq!(mode(&[], &[]).unwrap(), InstanceNames::Isolate);
        assert_eq!(
            mode(&["--namespaces.instance_names=ignore"], &[]).unwrap(),
            InstanceNames::Ignore
        );
        assert_eq!(
            mode(
                &[],
                &[("BAZEL_REMOTE_ENABLE_AC_KEY_INSTANCE_MANGLING", "true")]
            )
            .unwrap(),
            InstanceNames::MangleAc
        );
        assert_eq!(
            mode(
                &[
                    "--enable_ac_key_instance_mangling",
                    "--namespaces.instance_names=mangle_ac"
                ],
                &[]
            )
            .unwrap(),
            InstanceNames::MangleAc
        );
        assert!(
            mode(
                &[
                    "--enable_ac_key_instance_mangling",
                    "--namespaces.instance_names=ignore"
                ],
                &[]
            )
            .is_err()
        );
        assert!(
            load(
                &[
                    "--namespaces.instance_names=ignore",
                    "--namespaces.allowed=a"
                ],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hoard.yaml");
        std::fs::write(&file, "dir: /from/file\nmax_size: 3\nstorage_mode: uncompressed\nnamespaces:\n  allowed: [a, b]\n").unwrap();
        let f = file.to_str().unwrap();
        let c = load(&["--config_file", f], &[("BAZEL_REMOTE_MAX_SIZE", "4")]).unwrap();
        assert_eq!(c.dir, PathBuf::from("/from/file"));
        assert_eq!(c.max_size_bytes, 4 * GIB);
        assert_eq!(c.storage_mode, StorageMode::Uncompressed);
        assert_eq!(c.namespaces.allowed.as_ref().unwrap().len(), 2);
        let c = load(
            &["--config_file", f, "--max_size=5", "--dir", "/flag"],
            &[("BAZEL_REMOTE_MAX_SIZE", "4")],
        )
        .unwrap();
        assert_eq!(c.max_size_bytes, 5 * GIB);
        assert_eq!(c.dir, PathBuf::from("/flag"));
    }

    #[test]
    fn bad_values_name_the_key_and_the_source() {
        let e = load(&["--max_size=lots"], &[]).unwrap_err().to_string();
        assert!(
            e.contains("max_size") && e.contains("lots") && e.contains("flag --max_size"),
            "{e}"
        );
        let e = load(&[], &[("BAZEL_REMOTE_STORAGE_MODE", "gzip")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage_mode") && e.contains("BAZEL_REMOTE_STORAGE_MODE"),
            "{e}"
        );
        let e = load(&["--tls_cert_file=/x"], &[]).unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        let e = load(&["--ldap.url=x"], &[]).unwrap_err().to_string();
        assert!(e.contains("ldap") && e.contains("not supported"), "{e}");
        let e = load(&["--htpasswd_file=/nonexistent/x"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("htpasswd_file") && e.contains("cannot read"),
            "{e}"
        );
        let e = load(&["--allow_unauthenticated_reads=true"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("htpasswd_file is not"), "{e}");
        // From the environment as from a flag.
        for (name, key) in [
            ("BAZEL_REMOTE_HTPASSWD_FILE", "htpasswd_file"),
            (
                "BAZEL_REMOTE_UNAUTHENTICATED_READS",
                "allow_unauthenticated_reads",
            ),
            ("BAZEL_REMOTE_S3_SIGNATURE_TYPE", "s3_proxy.signature_type"),
        ] {
            let e = load(&[], &[(name, "x")]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(name), "{e}");
        }
        let e = load(&["--nonsense=1"], &[]).unwrap_err().to_string();
        assert!(e.contains("unknown flag --nonsense"), "{e}");
        let e = load(&["--http_address=nowhere"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("http_address"), "{e}");
        for e in [
            load(&["--max_size=0"], &[]).unwrap_err().to_string(),
            load(&["--namespaces.default=../x"], &[])
                .unwrap_err()
                .to_string(),
        ] {
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!("../../../README.md");
        for s in SETTINGS {
            assert!(
                readme.contains(&format!("| `{}` |", s.key))
                    || readme.contains(&format!("| `{}` (`--{}`) |", s.key, s.flag)),
                "README lacks {}",
                s.key
            );
        }
    }

    #[test]
    fn defaults_run_a_local_only_daemon() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c.dir, PathBuf::from("hoard-data"));
        assert_eq!(c.http_address.port(), 8080);
        assert!(c.fsync && c.access_log);
    }
}
