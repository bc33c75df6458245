//! Action results, trees and directories as clients (and the bucket) send
//! them: decoding and validation answer an error or a result whose every
//! digest is well formed.
#![no_main]

use hoard_proto::prost::Message;
use hoard_proto::reapi::{ActionResult, Directory, Tree};
use hoard_server::validate::{parse_digest, references, validate_action_result};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ar) = ActionResult::decode(data)
        && validate_action_result(&ar).is_ok()
    {
        // A valid action result's references are all parseable digests.
        let refs = references(&ar).expect("a validated action result has references");
        for d in refs.files.iter().chain(&refs.trees) {
            assert_eq!(d.hash.to_string().len(), 64);
        }
    }
    if let Ok(t) = Tree::decode(data) {
        for dir in t.root.iter().chain(&t.children) {
            for f in &dir.files {
                if let Some(d) = &f.digest {
                    let _ = parse_digest(d);
                }
            }
        }
    }
    if let Ok(d) = Directory::decode(data) {
        for n in &d.directories {
            if let Some(d) = &n.digest {
                let _ = parse_digest(d);
            }
        }
    }
});
