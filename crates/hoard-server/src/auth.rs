//! Who a request comes from and whether it may do what it asks:
//! bazel-remote's `htpasswd_file` (bcrypt entries only) and
//! `allow_unauthenticated_reads`, for HTTP (`Authorization: Basic`) and
//! gRPC (the `authorization` metadata) alike. The facade decides
//! ([`crate::Cache::authorize`]); front ends only hand over what the client
//! sent.
//!
//! # Cost
//!
//! bcrypt is slow on purpose (tens of milliseconds per check), so a client
//! must not be able to make hoard run it at will: a verified
//! user/password pair is remembered (by its SHA-256, never the password),
//! a refused one is answered from memory for [`REFUSED_FOR`], and at most
//! [`CONCURRENT_CHECKS`] checks run at once, on the blocking pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::error::{CacheError, ErrorKind};

/// What a request wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Who a request comes from: a user of the htpasswd file; without one, the
/// common name of the client certificate the TLS handshake verified
/// (`tls_ca_file`); or nobody (neither configured, or an unauthenticated
/// read).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Identity {
    pub user: Option<String>,
}

/// A user name and password as a client sent them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <password>)", self.user)
    }
}

/// Parses `Basic <base64 of user:password>`; None for anything else.
pub fn parse_basic(value: &[u8]) -> Option<Credentials> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(Credentials {
        user: user.to_string(),
        password: password.to_string(),
    })
}

/// How long a refused user/password pair is refused without a new check.
pub const REFUSED_FOR: Duration = Duration::from_secs(10);
/// bcrypt checks running at once.
pub const CONCURRENT_CHECKS: usize = 2;
/// Remembered pairs (verified and refused); the memory is cleared when full.
const REMEMBERED: usize = 10_000;

/// The users of an htpasswd file.
#[derive(Clone)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Htpasswd({} users)", self.users.len())
    }
}

impl Htpasswd {
    /// Parses an htpasswd file. Only bcrypt entries (`htpasswd -B`:
    /// `$2y$`, `$2a$`, `$2b$`) are accepted; any other line is an error
    /// naming its number (never its hash).
    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {n}: expected user:hash"));
            };
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            let bcrypt = ["$2y$", "$2a$", "$2b$"].iter().any(|p| hash.starts_with(p));
            if !bcrypt {
                return Err(format!(
                    "line {n}: user {user:?} has a hash that is not bcrypt; only bcrypt entries are supported (create them with htpasswd -B)"
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("line {n}: user {user:?} appears twice"));
            }
        }
        if users.is_empty() {
            return Err("no users in the file".into());
        }
        Ok(Htpasswd { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// The user names.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// The authentication policy and what it remembers.
pub struct Auth {
    htpasswd: Option<Htpasswd>,
    allow_unauthenticated_reads: bool,
    verified: parking_lot::Mutex<HashMap<[u8; 32], String>>,
    refused: parking_lot::Mutex<HashMap<[u8; 32], Instant>>,
    checks: Arc<Semaphore>,
}

impl Default for Auth {
    /// No authentication: everyone may do everything.
    fn default() -> Self {
        Auth::new(None, false)
    }
}

impl Auth {
    pub fn new(htpasswd: Option<Htpasswd>, allow_unauthenticated_reads: bool) -> Auth {
        Auth {
            htpasswd,
            allow_unauthenticated_reads,
            verified: parking_lot::Mutex::new(HashMap::new()),
            refused: parking_lot::Mutex::new(HashMap::new()),
            checks: Arc::new(Semaphore::new(CONCURRENT_CHECKS)),
        }
    }

    /// Whether requests must authenticate at all.
    pub fn enabled(&self) -> bool {
        self.htpasswd.is_some()
    }

    /// Decides whether a request with `creds` may have `access`. Wrong
    /// credentials are refused even where none would do: a client that
    /// sends a wrong password should learn it, not silently get less.
    ///
    /// `certified` is the common name of the connection's verified client
    /// certificate. With an htpasswd file, credentials decide and the
    /// certificate only opened the channel; without one, the certificate
    /// is the identity.
    pub async fn check(
        &self,
        creds: Option<Credentials>,
        access: Access,
        certified: Option<&str>,
    ) -> Result<Identity, CacheError> {
        let Some(file) = &self.htpasswd else {
            return Ok(Identity {
                user: certified.map(String::from),
            });
        };
        let Some(creds) = creds else {
            if access == Access::Read && self.allow_unauthenticated_reads {
                return Ok(Identity::default());
            }
            return Err(unauthenticated(match access {
                Access::Read => "authentication required: send a user and password (HTTP Basic)",
                Access::Write => {
                    "authentication required to write: send a user and password (HTTP Basic)"
                }
            }));
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(creds.user.as_bytes())
            .chain_update([0u8])
            .chain_update(creds.password.as_bytes())
            .finalize()
            .into();
        if let Some(user) = self.verified.lock().get(&key) {
            return Ok(Identity {
                user: Some(user.clone()),
            });
        }
        let refused = || unauthenticated("wrong user name or password");
        if self
            .refused
            .lock()
            .get(&key)
            .is_some_and(|t| t.elapsed() < REFUSED_FOR)
        {
            return Err(refused());
        }
        let Some(hash) = file.users.get(&creds.user).cloned() else {
            remember(&self.refused, key, Instant::now());
            return Err(refused());
        };
        let _slot = Arc::clone(&self.checks)
            .acquire_owned()
            .await
            .map_err(|_| CacheError::new(ErrorKind::Unavailable, "server is shutting down"))?;
        let password = creds.password.clone();
        let ok = tokio::task::spawn_blocking(move || {
            hoard_disk::lower_thread_priority();
            bcrypt::verify(password, &hash)
        })
        .await
        .map_err(|e| CacheError::internal(format!("password check failed: {e}")))?
        .unwrap_or(false);
        if !ok {
            remember(&self.refused, key, Instant::now());
            return Err(refused());
        }
        remember(&self.verified, key, creds.user.clone());
        Ok(Identity {
            user: Some(creds.user),
        })
    }
}

fn remember<V>(map: &parking_lot::Mutex<HashMap<[u8; 32], V>>, key: [u8; 32], v: V) {
    let mut m = map.lock();
    if m.len() >= REMEMBERED {
        m.clear();
    }
    m.insert(key, v);
}

fn unauthenticated(msg: &str) -> CacheError {
    CacheError::new(ErrorKind::Unauthenticated, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, pw: &str) -> Vec<u8> {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        format!("Basic {b}").into_bytes()
    }

    #[test]
    fn only_bcrypt_entries_are_accepted_and_errors_name_the_line() {
        let h = bcrypt::hash("pw", 4).unwrap();
        assert_eq!(
            Htpasswd::parse(&format!("# c\nann:{h}\n")).unwrap().len(),
            1
        );
        let e = Htpasswd::parse(&format!("ann:{h}\nbob:{{SHA}}abc\n"))
            .err()
            .unwrap();
        assert!(
            e.contains("line 2") && e.contains("bob") && !e.contains("abc"),
            "{e}"
        );
        assert!(Htpasswd::parse("ann:$apr1$x$y").is_err());
        assert!(Htpasswd::parse("").is_err());
    }

    #[tokio::test]
    async fn the_policy_and_its_memory() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let auth = Auth::new(Htpasswd::parse(&format!("ann:{h}")).ok(), true);
        let ann = parse_basic(&basic("ann", "pw"));
        assert_eq!(
            auth.check(ann.clone(), Access::Write, None)
                .await
                .unwrap()
                .user
                .as_deref(),
            Some("ann")
        );
        // Remembered: a second check needs no bcrypt.
        assert!(auth.check(ann, Access::Write, None).await.is_ok());
        assert!(auth.check(None, Access::Read, None).await.is_ok());
        let e = auth.check(None, Access::Write, None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthenticated);
        let wrong = parse_basic(&basic("ann", "nope"));
        assert!(auth.check(wrong.clone(), Access::Read, None).await.is_err());
        assert!(auth.check(wrong, Access::Read, None).await.is_err());
        assert!(
            auth.check(parse_basic(&basic("zed", "pw")), Access::Read, None)
                .await
                .is_err()
        );
        assert!(parse_basic(b"Bearer abc").is_none());
        assert!(parse_basic(b"Basic !!!").is_none());
        let open = Auth::default();
        assert!(open.check(None, Access::Write, None).await.is_ok());
        // Without an htpasswd file a verified certificate names the client;
        // with one, the credentials decide.
        let by_cert = open.check(None, Access::Write, Some("team-a")).await;
        assert_eq!(by_cert.unwrap().user.as_deref(), Some("team-a"));
        let e = auth.check(None, Access::Write, Some("team-a")).await;
        assert_eq!(e.unwrap_err().kind, ErrorKind::Unauthenticated);
    }
}
