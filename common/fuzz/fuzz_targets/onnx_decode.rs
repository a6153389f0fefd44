//! libFuzzer harness for the ONNX ModelProto decoder; the checks live in
//! `fedinspect_common::fuzzing::onnx_decode`, which the stable replay test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedinspect_common::fuzzing::onnx_decode(data);
});
