// Shared by the build scripts of the crates whose binaries and tests link LibTorch (included
// with `include!`). torch-sys exports the LibTorch lib folder as DEP_TCH_LIBTORCH_LIB; an rpath
// to it lets binaries run without LD_LIBRARY_PATH. When the CUDA build is present the CUDA
// library is linked with --no-as-needed, otherwise the linker drops it and CUDA is never seen.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
