//! The upload journal as a start finds it, torn or damaged: the replay
//! never panics and is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        hoard_upload::fuzz_journal(text);
    }
});
