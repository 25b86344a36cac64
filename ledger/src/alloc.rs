//! The memory allocator of the binaries that run replicas, chosen by the process's role
//! (ARCHITECTURE.md, "Memory"): mimalloc for a replica (`hoard node`, `hoard-loadtest node`), the
//! system's (glibc) for everything else, the gateway first. The library sets no allocator; a
//! binary opts in with `#[global_allocator] static A: RoleAllocator = RoleAllocator;`.
//!
//! Why two. A replica's ledger is a few large hash maps and vectors that grow by doubling, and
//! every block allocates and frees a payload per transaction on two threads: glibc hands large
//! freed blocks back to the kernel and the apply then faults zeroed pages in again (36,721 page
//! faults in the first 1.5 s of `hoard-ledger-bench`'s apply, 665 with mimalloc); the apply
//! measured 1.22x faster with mimalloc. The gateway holds thousands of idle connections of a few
//! small allocations each, where mimalloc costs more: 8,732 and 9,168 bytes per idle connection
//! against 7,607 and 7,594 with glibc (`hoard-loadtest idle --connections 10000`; the target is
//! 8,192). BENCHMARKS.md, nineteenth session.
//!
//! How. The choice is made once, at the process's first allocation, before any block exists that
//! the other allocator could be handed: from `/proc/self/cmdline`, read without allocating.
//! Every later call goes to the allocator chosen then, so a block is always freed or resized by
//! the allocator that made it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const MIMALLOC: u8 = 2;

static CHOSEN: AtomicU8 = AtomicU8::new(UNDECIDED);

/// mimalloc for a replica's process, the system's allocator otherwise (see the module).
pub struct RoleAllocator;

/// Whether a command line, as `/proc/self/cmdline` holds it (each argument ended by a NUL), runs
/// a replica: its first argument after the program is `node` (neither binary takes options
/// before its subcommand).
pub fn runs_a_replica(cmdline: &[u8]) -> bool {
    cmdline.split(|&byte| byte == 0).nth(1) == Some(b"node".as_slice())
}

/// The allocator this process uses: `"mimalloc"` or `"system"`.
pub fn name() -> &'static str {
    match chosen() {
        MIMALLOC => "mimalloc",
        _ => "system",
    }
}

fn chosen() -> u8 {
    let chosen = CHOSEN.load(Ordering::Relaxed);
    if chosen != UNDECIDED {
        return chosen;
    }
    // Deterministic: two threads deciding at once decide the same.
    let mut buffer = [0u8; 4096];
    let decided = if runs_a_replica(read_cmdline(&mut buffer)) {
        MIMALLOC
    } else {
        SYSTEM
    };
    CHOSEN.store(decided, Ordering::Relaxed);
    decided
}

/// `/proc/self/cmdline` into `buffer` (cut at its length), without allocating; empty where there
/// is none.
fn read_cmdline(buffer: &mut [u8]) -> &[u8] {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a NUL-terminated path; `read` writes at most the buffer's remaining length into
        // the buffer; the descriptor is closed on every path after it was opened.
        unsafe {
            let fd = libc::open(c"/proc/self/cmdline".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return &[];
            }
            let mut filled = 0;
            while filled < buffer.len() {
                let read = libc::read(fd, buffer[filled..].as_mut_ptr().cast(), buffer.len() - filled);
                if read <= 0 {
                    break;
                }
                filled += read as usize;
            }
            libc::close(fd);
            &buffer[..filled]
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buffer;
        &[]
    }
}

// SAFETY: every call goes to one of two allocators that keep `GlobalAlloc`'s contract, the same
// one for the life of the process (chosen before the first block exists), so a block is freed or
// resized by the allocator that made it.
unsafe impl GlobalAlloc for RoleAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match chosen() {
            MIMALLOC => MiMalloc.alloc(layout),
            _ => System.alloc(layout),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match chosen() {
            MIMALLOC => MiMalloc.alloc_zeroed(layout),
            _ => System.alloc_zeroed(layout),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match chosen() {
            MIMALLOC => MiMalloc.dealloc(ptr, layout),
            _ => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match chosen() {
            MIMALLOC => MiMalloc.realloc(ptr, layout, new_size),
            _ => System.realloc(ptr, layout, new_size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_node_subcommand_runs_a_replica() {
        assert!(runs_a_replica(b"/usr/bin/hoard\0node\0--config\0n.toml\0"));
        assert!(runs_a_replica(b"hoard-loadtest\0node\0"));
        assert!(!runs_a_replica(b"hoard\0gateway\0--config\0node\0"));
        assert!(!runs_a_replica(b"hoard\0demo\0"));
        assert!(!runs_a_replica(b"hoard\0nodes\0"));
        assert!(!runs_a_replica(b"hoard\0"));
        assert!(!runs_a_replica(b""));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_reads_its_own_command_line() {
        let mut buffer = [0u8; 4096];
        let cmdline = read_cmdline(&mut buffer);
        assert!(!cmdline.is_empty());
        // This test binary is not a replica.
        assert!(!runs_a_replica(cmdline));
        assert_eq!(name(), "system");
    }
}
