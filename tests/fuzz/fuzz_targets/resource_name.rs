//! ByteStream resource names: every part is checked before use, so what
//! parses has a valid instance, a 64-hex hash, and (for writes) an upload
//! id; and an error message never echoes a long name whole.
#![no_main]

use hoard_server::grpc::resource::{parse_read, parse_write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let name = String::from_utf8_lossy(data);
    for parsed in [parse_read(&name), parse_write(&name)] {
        match parsed {
            Ok(r) => {
                if !r.instance.is_empty() {
                    assert!(hoard_disk::validate_namespace(&r.instance).is_ok());
                }
                assert_eq!(r.hash.to_string().len(), 64);
            }
            Err(s) => assert!(s.message().len() <= 600, "{}", s.message().len()),
        }
    }
    if let Ok(w) = parse_write(&name) {
        assert!(w.upload_id.is_some());
    }
});
