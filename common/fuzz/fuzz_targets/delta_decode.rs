//! libFuzzer harness for the streaming delta decoder against a small fixed
//! base layout; the checks live in
//! `fedinspect_common::fuzzing::delta_decode`, which the stable replay test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedinspect_common::fuzzing::delta_decode(data);
});
