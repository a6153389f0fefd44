//! libFuzzer harness for the safetensors model reader; the checks live in
//! `fedinspect_common::fuzzing::safetensors_read`, which the stable replay test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedinspect_common::fuzzing::safetensors_read(data);
});
