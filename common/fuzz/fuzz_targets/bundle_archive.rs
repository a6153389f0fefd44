//! libFuzzer harness for unpack of a bundle tar stream, then verify_bundle; the checks live in
//! `fedinspect_common::fuzzing::bundle_archive`, which the stable replay test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedinspect_common::fuzzing::bundle_archive(data);
});
