//! libFuzzer harness for the protocol's messages: prost decoding and the coordinator's edge
//! conversion; the checks live in `fedinspect_fuzz::proto::proto_messages`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedinspect_fuzz::proto::proto_messages(data);
});
