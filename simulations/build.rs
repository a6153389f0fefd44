//! Links LibTorch with an rpath so binaries and tests run without LD_LIBRARY_PATH.
include!("../build-support/libtorch_link.rs");

fn main() {
    link_libtorch();
}
