//! Blob identity: kind, SHA-256 hash and namespace.

use std::fmt;
use std::str::FromStr;

/// Which keyspace a blob lives in.
///
/// The on-disk directory names (`ac.v2`, `cas.v2`, `raw.v2`) are bazel-remote's,
/// so a cache directory can move between the two daemons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Action cache: serialized `ActionResult`s keyed by action digest.
    Ac,
    /// Content-addressable storage: blobs keyed by the hash of their bytes.
    Cas,
    /// bazel-remote's unvalidated HTTP action cache. hoard never writes it,
    /// but counts and evicts what an earlier bazel-remote left there.
    Raw,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Ac, Kind::Cas, Kind::Raw];

    /// The lower-case name used in URLs, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ac => "ac",
            Kind::Cas => "cas",
            Kind::Raw => "raw",
        }
    }

    pub(crate) fn dir_name(self) -> &'static str {
        match self {
            Kind::Ac => "ac.v2",
            Kind::Cas => "cas.v2",
            Kind::Raw => "raw.v2",
        }
    }

    pub(crate) fn bits(self) -> u16 {
        match self {
            Kind::Ac => 0,
            Kind::Cas => 1,
            Kind::Raw => 2,
        }
    }

    pub(crate) fn from_bits(bits: u16) -> Kind {
        match bits {
            0 => Kind::Ac,
            1 => Kind::Cas,
            _ => Kind::Raw,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SHA-256 hash. Parsing accepts exactly 64 lower-case hex characters,
/// which is also what makes it safe to build a file name from one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

/// The hash of the empty blob, which always exists and is never stored.
pub const EMPTY_SHA256: Hash = Hash([
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
]);

/// Why a string is not a valid hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("expected 64 hex characters, got {0}")]
    Length(usize),
    #[error("expected lower-case hex [0-9a-f], found {0:?}")]
    NotLowerHex(char),
}

impl Hash {
    /// Parses 64 lower-case hex characters.
    pub fn parse(s: &str) -> Result<Hash, HashError> {
        Self::parse_bytes(s.as_bytes())
    }

    /// FindMissingBlobs parses one hash per digest, 10,000 to a call, so
    /// this is a table lookup per character with one check at the end
    /// rather than a branch per character.
    pub(crate) fn parse_bytes(s: &[u8]) -> Result<Hash, HashError> {
        if s.len() != 64 {
            return Err(HashError::Length(s.len()));
        }
        let mut out = [0u8; 32];
        let mut seen = 0u8;
        for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let (hi, lo) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
            seen |= hi | lo;
            *o = (hi << 4) | lo;
        }
        if seen & NOT_HEX != 0 {
            let c = s
                .iter()
                .find(|c| NIBBLE[**c as usize] == NOT_HEX)
                .map_or('?', |c| *c as char);
            return Err(HashError::NotLowerHex(c));
        }
        Ok(Hash(out))
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn is_empty_blob(&self) -> bool {
        *self == EMPTY_SHA256
    }
}

/// Marks a byte that is not a lower-case hex digit in [`NIBBLE`].
const NOT_HEX: u8 = 0x10;

/// The value of each lower-case hex digit; [`NOT_HEX`] for every other byte.
const NIBBLE: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl FromStr for Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Hash, HashError> {
        Hash::parse(s)
    }
}

impl Hash {
    /// Lower-case hex into `buf`, without allocating.
    pub fn hex_into<'a>(&self, buf: &'a mut [u8; 64]) -> &'a str {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in self.0.iter().enumerate() {
            buf[2 * i] = HEX[(b >> 4) as usize];
            buf[2 * i + 1] = HEX[(b & 15) as usize];
        }
        // Only ASCII hex digits were written.
        std::str::from_utf8(buf).unwrap_or("")
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

/// A namespace, interned by the cache. Id 0 is the default namespace, whose
/// files sit directly under the cache directory exactly where bazel-remote
/// puts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(pub(crate) u16);

impl NamespaceId {
    pub const DEFAULT: NamespaceId = NamespaceId(0);

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Why a namespace name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error(
        "namespace {0:?} is not valid: use 1-128 characters of [A-Za-z0-9._-] in '/'-separated segments, none empty, '.' or '..'"
    )]
    Invalid(String),
    #[error("namespace {0:?} cannot be created: the limit of {1} namespaces is reached")]
    TooMany(String, usize),
    #[error(
        "instance name {0:?} uses the reserved word {1:?}: REAPI resource names reserve blobs, uploads, compressed-blobs, actions, actionResults, operations and capabilities; pick another name"
    )]
    Reserved(String, &'static str),
}

/// Words REAPI resource names use as separators; an instance name holding
/// one as a segment would make `{instance}/blobs/...` ambiguous, so such
/// names are refused on every front end alike.
pub const RESERVED_WORDS: [&str; 7] = [
    "blobs",
    "uploads",
    "compressed-blobs",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
];

/// Checks a namespace name. Names may have several `/`-separated segments
/// (REAPI instance names often do); on disk `/` becomes `+`, which names may
/// not contain, so the mapping is one-to-one and no name can step outside
/// the cache directory.
pub fn validate_namespace(name: &str) -> Result<(), NamespaceError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        });
    if !ok {
        return Err(NamespaceError::Invalid(name.to_string()));
    }
    if let Some(word) = name
        .split('/')
        .find_map(|seg| RESERVED_WORDS.iter().find(|w| **w == seg))
    {
        return Err(NamespaceError::Reserved(name.to_string(), word));
    }
    Ok(())
}

pub(crate) fn namespace_dir_name(name: &str) -> String {
    name.replace('/', "+")
}

pub(crate) fn namespace_from_dir_name(dir: &str) -> String {
    dir.replace('+', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_parse_accepts_only_lower_hex_of_length_64() {
        let h = EMPTY_SHA256.to_hex();
        assert_eq!(Hash::parse(&h).unwrap(), EMPTY_SHA256);
        assert_eq!(Hash::parse(&h[..63]), Err(HashError::Length(63)));
        assert_eq!(
            Hash::parse(&h.to_uppercase()),
            Err(HashError::NotLowerHex('E'))
        );
        let mut bad = h.clone();
        bad.replace_range(0..1, "/");
        assert!(Hash::parse(&bad).is_err());
        // Every byte, first and last: only 0-9 and a-f parse, to their value.
        for at in [0, 63] {
            for c in 0..=255u8 {
                let mut b = h.clone().into_bytes();
                b[at] = c;
                let want = match c {
                    b'0'..=b'9' | b'a'..=b'f' => Ok(hex::decode(&b).unwrap()),
                    _ => Err(HashError::NotLowerHex(c as char)),
                };
                assert_eq!(
                    Hash::parse_bytes(&b).map(|x| x.0.to_vec()),
                    want,
                    "{c} at {at}"
                );
            }
        }
    }

    #[test]
    fn namespace_names_cannot_traverse() {
        for bad in [
            "", "..", "a/../b", "a//b", "/a", "a/", "a+b", "a b", "%2e%2e", "a\\b",
        ] {
            assert!(validate_namespace(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["ci", "team-a/linux_x86", "v1.2"] {
            assert!(validate_namespace(good).is_ok(), "{good:?} refused");
        }
        assert_eq!(namespace_from_dir_name(&namespace_dir_name("a/b")), "a/b");
    }
}
