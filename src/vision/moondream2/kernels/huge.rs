//! Buffers that the OS is asked to back with 2 MiB pages (transparent huge pages), for
//! the packed weights: a decode step reads all of them (1.4 GB in q8); on 4 KiB pages
//! that is a TLB miss, and a page walk (dearer in a VM), every few KiB. On this
//! project's 2-core VM a q8 decode step went from 57 to 53–55 ms at batch 1.
//! (The KV cache stays on base pages: a huge page makes its reserved room resident.)

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Plain values: valid as all-zero bytes, nothing to drop, shareable between threads.
pub trait Plain: Copy + Send + Sync + 'static {}

impl Plain for u8 {}
impl Plain for i8 {}
impl Plain for u16 {}
impl Plain for f32 {}
impl Plain for half::f16 {}

/// Size (and alignment) of a huge page.
const HUGE: usize = 2 << 20;

/// A growable buffer of plain values; from 2 MiB up it lives on its own anonymous
/// mapping, aligned to 2 MiB, whose whole 2 MiB pages are advised for huge pages (a
/// hint: with transparent huge pages off, or off Linux, it is ordinary memory).
/// Smaller ones use the allocator.
pub struct HugeVec<T: Plain> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
}

// SAFETY: HugeVec owns its values (plain data) like a Vec does.
unsafe impl<T: Plain> Send for HugeVec<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Plain> Sync for HugeVec<T> {}

impl<T: Plain> HugeVec<T> {
    /// An empty buffer (allocates nothing).
    pub fn new() -> Self {
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
        }
    }

    /// An empty buffer with room for `cap` values.
    pub fn with_capacity(cap: usize) -> Self {
        let mut v = Self::new();
        v.reserve(cap);
        v
    }

    /// `len` copies of `value`.
    pub fn filled(len: usize, value: T) -> Self {
        let mut v = Self::with_capacity(len);
        v.resize(len, value);
        v
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values it can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Room for `extra` more values (grows to at least twice the capacity when it must).
    pub fn reserve(&mut self, extra: usize) {
        let need = self.len.checked_add(extra).expect("capacity overflow");
        if need <= self.cap {
            return;
        }
        let cap = need.max(2 * self.cap);
        let ptr = alloc::<T>(cap);
        // SAFETY: both regions hold at least `len` values and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), ptr.as_ptr(), self.len) };
        // SAFETY: the old region came from `alloc` with `self.cap`.
        unsafe { free(self.ptr, self.cap) };
        (self.ptr, self.cap) = (ptr, cap);
    }

    /// Sets the length to `len`, new values being `value`.
    pub fn resize(&mut self, len: usize, value: T) {
        if len > self.len {
            self.reserve(len - self.len);
            // SAFETY: capacity covers `len`; the values are plain.
            let tail = unsafe {
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.len), len - self.len)
            };
            tail.fill(value);
        }
        self.len = len;
    }

    /// Appends `values`.
    pub fn extend_from_slice(&mut self, values: &[T]) {
        self.reserve(values.len());
        // SAFETY: capacity covers the new values; `values` cannot alias our spare room.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.as_ptr().add(self.len),
                values.len(),
            )
        };
        self.len += values.len();
    }

    /// A copy with room for `extra` more values.
    pub fn copy_with_room(&self, extra: usize) -> Self {
        let mut v = Self::with_capacity(self.len + extra);
        v.extend_from_slice(self);
        v
    }
}

impl<T: Plain> Default for HugeVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Plain> Drop for HugeVec<T> {
    fn drop(&mut self) {
        // SAFETY: the region came from `alloc` with `self.cap` (or is dangling and 0).
        unsafe { free(self.ptr, self.cap) };
    }
}

impl<T: Plain> Deref for HugeVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` values are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> DerefMut for HugeVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: the first `len` values are initialised and ours alone.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Plain> Clone for HugeVec<T> {
    fn clone(&self) -> Self {
        self.copy_with_room(0)
    }
}

impl<T: Plain> std::fmt::Debug for HugeVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeVec({} values)", self.len)
    }
}

impl<T: Plain> From<&[T]> for HugeVec<T> {
    fn from(values: &[T]) -> Self {
        let mut v = Self::with_capacity(values.len());
        v.extend_from_slice(values);
        v
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

/// Room for `cap` values (`cap > 0`), zeroed.
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
    use super::HugeVec;

    #[test]
    fn grows_copies_and_clones_like_a_vec() {
        let mut v: HugeVec<u16> = HugeVec::new();
        let mut model = Vec::new();
        // Through the small path into the mapped one (2 MiB = 1 Mi u16 values).
        for round in 0..40u16 {
            let chunk: Vec<u16> = (0..50_000).map(|i| (i as u16) ^ round).collect();
            v.extend_from_slice(&chunk);
            model.extend_from_slice(&chunk);
        }
        assert_eq!(&v[..], &model[..]);
        v.resize(10, 7);
        model.resize(10, 7);
        v.resize(20, 7);
        model.resize(20, 7);
        assert_eq!(&v[..], &model[..]);
        let c = v.copy_with_room(3_000_000);
        assert!(c.capacity() >= 3_000_020);
        assert_eq!(&c[..], &model[..]);
        let big = HugeVec::filled(3 << 20, 128u8);
        assert!(big.iter().all(|&b| b == 128));
        assert_eq!(big.as_ptr() as usize % (2 << 20), 0, "2 MiB aligned");
        assert_eq!(big.clone()[..], big[..]);
    }
}
