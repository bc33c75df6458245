//! A request line's path and a set of headers, as hyper would hand them
//! over: the cache path parser and the PUT header checks must refuse what
//! is wrong with an error, never panic, and what they accept must hold.
#![no_main]

use hoard_disk::Kind;
use hoard_server::Encoding;
use hoard_server::http::{parse_cache_path, put_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let path = lines.next().unwrap_or("");
    if let Ok((instance, kind, hash)) = parse_cache_path(path) {
        // What parses names a valid namespace and prints back to itself.
        if !instance.is_empty() {
            assert!(hoard_disk::validate_namespace(&instance).is_ok());
        }
        let prefix = if instance.is_empty() {
            String::new()
        } else {
            format!("/{instance}")
        };
        let again = format!("{prefix}/{}/{hash}", kind.as_str());
        let reparsed = parse_cache_path(&again).map(|(i, k, h)| (i, k.as_str(), h));
        assert_eq!(reparsed.ok(), Some((instance, kind.as_str(), hash)));
    }
    let mut h = http::HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_bytes(value.trim().as_bytes()),
        ) {
            h.append(n, v);
        }
    }
    for kind in [Kind::Ac, Kind::Cas, Kind::Raw] {
        let Ok(head) = put_head(&h, kind) else {
            continue;
        };
        match head.encoding {
            // An identity body is exactly its declared size.
            Encoding::Identity => {
                if let Some(c) = head.content_length {
                    assert_eq!(c, head.size);
                }
            }
            // A zstd body is never allowed past the bound of its size.
            Encoding::Zstd => {
                if let Some(c) = head.content_length {
                    assert!(c <= hoard_server::http::zstd_bound(head.size));
                }
            }
        }
        assert!(!head.json || kind == Kind::Ac);
    }
});
