//! Accounting's spool batches and cursor file as a start finds them: the
//! bytes before the first NUL are a batch, the rest the cursor.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (batch, rest) = data.split_at(split);
    let cursor = String::from_utf8_lossy(rest.get(1..).unwrap_or_default());
    hoard_accounting::fuzz_spool_records(batch, &cursor);
});
