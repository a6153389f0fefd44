//! libFuzzer harness for the bundle manifest parser and checks, as
//! verify_bundle runs them; the checks live in
//! `fedinspect_common::fuzzing::bundle_manifest`, which the stable replay test runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fedinspect_common::fuzzing::bundle_manifest(data);
});
