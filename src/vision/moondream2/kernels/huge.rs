//! Buffers that the OS is asked to back with 2 MiB pages (transparent huge pages), for
//! the packed weights: a decode step reads all of them (1.4 GB in q8); on 4 KiB pages
//! that is a TLB miss, and a page walk (dearer in a VM), every few KiB. On this
//! project's 2-core VM a q8 decode step went from 57 to 53–55 ms at batch 1.
//! (The KV cache stays on base pages: a huge page makes its reserved room resident.)

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Plain values: valid as all-zero bytes, nothing to drop, shareable between threads.
pub(super) trait Plain: Copy + Send + Sync + 'static {}

impl Plain for u8 {}
impl Plain for u16 {}
impl Plain for half::f16 {}

/// Size (and alignment) of a huge page.
const HUGE: usize = 2 << 20;

/// A fixed-size buffer of plain values; from 2 MiB up it lives on its own anonymous
/// mapping, aligned to 2 MiB, whose whole 2 MiB pages are advised for huge pages (a
/// hint: with transparent huge pages off, or off Linux, it is ordinary memory).
/// Smaller ones use the allocator.
pub(super) struct HugeBuf<T: Plain> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: HugeBuf owns its values (plain data) like a Vec does.
unsafe impl<T: Plain> Send for HugeBuf<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Plain> Sync for HugeBuf<T> {}

impl<T: Plain> HugeBuf<T> {
    /// `len` copies of `value`.
    pub(super) fn filled(len: usize, value: T) -> Self {
        let mut buf = Self {
            ptr: alloc::<T>(len),
            len,
        };
        buf.fill(value);
        buf
    }
}

impl<T: Plain> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        // SAFETY: the region came from `alloc` with `self.len`.
        unsafe { free(self.ptr, self.len) };
    }
}

impl<T: Plain> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` values, initialised (zeroed, then filled).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and ours alone.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> Clone for HugeBuf<T> {
    fn clone(&self) -> Self {
        let mut copy = Self {
            ptr: alloc::<T>(self.len),
            len: self.len,
        };
        copy.copy_from_slice(self);
        copy
    }
}

impl<T: Plain> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf({} values)", self.len)
    }
}

/// Bytes of `cap` values (panics on overflow, as a Vec does).
fn bytes<T>(cap: usize) -> usize {
    cap.checked_mul(size_of::<T>()).expect("capacity overflow")
}

/// Whether a region of `bytes` gets its own huge-page mapping.
fn mapped(bytes: usize) -> bool {
    cfg!(target_os = "linux") && bytes >= HUGE
}

/// Room for `cap` values, zeroed (dangling when that is no bytes).
fn alloc<T: Plain>(cap: usize) -> NonNull<T> {
    let size = bytes::<T>(cap);
    if size == 0 {
        return NonNull::dangling();
    }
    #[cfg(target_os = "linux")]
    if mapped(size) {
        return map_huge(size).cast();
    }
    let layout = small_layout::<T>(size);
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    NonNull::new(p as *mut T).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
}

/// Gives back what `alloc::<T>(cap)` returned.
///
/// # Safety
/// `ptr` came from `alloc::<T>(cap)` (or is dangling with `cap` 0) and is not used after.
unsafe fn free<T: Plain>(ptr: NonNull<T>, cap: usize) {
    let size = bytes::<T>(cap);
    if size == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    if mapped(size) {
        // SAFETY: per the contract, the mapping `map_huge(size)` made.
        unsafe { libc::munmap(ptr.as_ptr().cast(), mapped_len(size)) };
        return;
    }
    // SAFETY: per the contract, allocated with this layout.
    unsafe { std::alloc::dealloc(ptr.as_ptr().cast(), small_layout::<T>(size)) };
}

fn small_layout<T>(size: usize) -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(size, align_of::<T>().max(64)).expect("buffer layout")
}

/// Bytes a mapping of `size` bytes spans: whole base pages.
#[cfg(target_os = "linux")]
fn mapped_len(size: usize) -> usize {
    // SAFETY: sysconf only reads a system value.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    size.next_multiple_of(page.max(1))
}

/// A zeroed anonymous mapping of `size` bytes starting on a 2 MiB boundary, its whole
/// 2 MiB pages advised for huge pages before anything touches them (the tail of a
/// last, partial one stays on base pages, so no memory is wasted).
#[cfg(target_os = "linux")]
fn map_huge(size: usize) -> NonNull<u8> {
    let len = mapped_len(size);
    // SAFETY: a fresh private anonymous mapping; nothing else is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        std::alloc::handle_alloc_error(small_layout::<u8>(size));
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE);
    // SAFETY: the head and tail lie inside the mapping just made and are not used.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let (tail, end) = (aligned + len, start + len + HUGE);
        if end > tail {
            libc::munmap(tail as *mut libc::c_void, end - tail);
        }
        // A hint: refused (THP off) it changes nothing.
        let whole = size / HUGE * HUGE;
        libc::madvise(aligned as *mut libc::c_void, whole, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8).expect("mapping is not null")
}

#[cfg(test)]
mod tests {
    use super::HugeBuf;

    #[test]
    fn filled_buffers_hold_their_values_small_and_mapped() {
        // Under 2 MiB (the allocator) and over it (an aligned mapping).
        let small = HugeBuf::filled(50_000, 7u16);
        assert!(small.iter().all(|&v| v == 7));
        let mut big = HugeBuf::filled(3 << 20, 128u8);
        assert!(big.iter().all(|&b| b == 128));
        assert_eq!(big.as_ptr() as usize % (2 << 20), 0, "2 MiB aligned");
        big[(3 << 20) - 1] = 5;
        let copy = big.clone();
        assert_eq!(copy[..], big[..]);
        assert_eq!(small.clone()[..], small[..]);
    }
}
