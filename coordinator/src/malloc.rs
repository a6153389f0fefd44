//! glibc malloc tuning for a long-running coordinator: a fixed, small number of arenas.
//!
//! glibc gives each thread that contends for the heap an arena of its own, up to 8 per core,
//! and memory freed in one arena is not reused by another. The coordinator hands uploads,
//! downloads and storage calls to tokio's blocking pool, whose threads come and go, so its
//! resident memory crept up round after round: 256 in-process plants, 30 rounds, 73 MiB
//! after round 1 and 162 MiB after round 30, still rising; with two arenas 49 MiB and 94 MiB,
//! flat over the last 15 rounds (docs/simulations.md, "Scale figures"). A no-op off glibc,
//! and `MALLOC_ARENA_MAX` set in the environment wins.
//!
//! [`release_free_memory`] hands the arenas' free pages back; the round driver calls it after
//! every round.

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

/// Hands the free pages of every glibc arena back to the kernel (`malloc_trim(0)`); true if
/// any memory was released. The round driver calls it after each round: the heap is
/// fragmented by long-lived small allocations (sled's cached records) between the transient
/// buffers of uploads and aggregation, and without it the arenas' free pages stayed resident
/// and resident memory grew about 200 KiB a round at 64 plants (docs/benchmarks.md,
/// "Coordinator memory over rounds"). A few milliseconds; a no-op off glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and runs under glibc's arena locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}
