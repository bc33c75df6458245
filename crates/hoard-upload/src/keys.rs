//! Object keys, bazel-remote compatible so a bucket can be shared with
//! bazel-remote hosts:
//!
//! ```text
//! <prefix>/cas.v2/<hh>/<hash>    casblob bytes (zstd storage mode)
//! <prefix>/cas/<hh>/<hash>       raw bytes (uncompressed storage mode)
//! <prefix>/ac/<hh>/<hash>        ActionResult bytes
//! <prefix>/ns.v1/<namespace>/... the same, for a non-default namespace
//! ```

use hoard_disk::{Hash, Kind};

/// What a key holds, which decides how a reader decodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectFormat {
    /// A casblob: a zstd stream with a skippable header frame.
    Casblob,
    /// The content itself.
    Raw,
}

pub fn object_key(
    prefix: &str,
    namespace: &str,
    kind: Kind,
    hash: &Hash,
    format: ObjectFormat,
) -> String {
    let hex = hash.to_hex();
    let dir = match (kind, format) {
        (Kind::Cas, ObjectFormat::Casblob) => "cas.v2",
        (Kind::Cas, ObjectFormat::Raw) => "cas",
        (Kind::Ac, _) => "ac",
        (Kind::Raw, _) => "raw",
    };
    let mut key = String::with_capacity(prefix.len() + namespace.len() + 90);
    if !prefix.is_empty() {
        key.push_str(prefix.trim_end_matches('/'));
        key.push('/');
    }
    if !namespace.is_empty() {
        key.push_str("ns.v1/");
        key.push_str(namespace);
        key.push('/');
    }
    key.push_str(dir);
    key.push('/');
    key.push_str(&hex[..2]);
    key.push('/');
    key.push_str(&hex);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_bazel_remote_and_namespaces_get_their_own_level() {
        let h = Hash([0xab; 32]);
        let hex = h.to_hex();
        assert_eq!(
            object_key("", "", Kind::Cas, &h, ObjectFormat::Casblob),
            format!("cas.v2/ab/{hex}")
        );
        assert_eq!(
            object_key("p/", "", Kind::Ac, &h, ObjectFormat::Raw),
            format!("p/ac/ab/{hex}")
        );
        assert_eq!(
            object_key("p", "team/x", Kind::Cas, &h, ObjectFormat::Raw),
            format!("p/ns.v1/team/x/cas/ab/{hex}")
        );
    }
}
