//! glibc malloc tuning for a long-running coordinator: a fixed, small number of arenas.
//!
//! glibc gives each thread that contends for the heap an arena of its own, up to 8 per core,
//! and memory freed in one arena is not reused by another. The coordinator hands uploads,
//! downloads and storage calls to tokio's blocking pool, whose threads come and go, so its
//! resident memory crept up round after round: 256 in-process plants, 30 rounds, 73 MiB
//! after round 1 and 162 MiB after round 30, still rising; with two arenas 49 MiB and 94 MiB,
//! flat over the last 15 rounds (docs/simulations.md, "Scale figures"). A no-op off glibc,
//! and `MALLOC_ARENA_MAX` set in the environment wins.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_arenas() {
    // Parameter number from glibc's <malloc.h>.
    const M_ARENA_MAX: i32 = -8;
    const ARENAS: i32 = 2;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only sets an allocator parameter under glibc's own lock; it takes no
    // pointers. A refused value (return 0) leaves glibc's default in place, which is safe.
    unsafe {
        libc::mallopt(M_ARENA_MAX, ARENAS);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() {}
