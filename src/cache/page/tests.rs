//! Unit tests of a page's arithmetic: block indices from addresses, links
//! that stay inside the page, and the geometry of every class.

use super::*;

/// `exact_quotient` is the quotient for every multiple of every block
/// size, and above `u32::MAX / d` for every other 32-bit value: all of
/// those `index_of` can meet (below `PAGE_SIZE`, or wrapped from below
/// zero), and a sample of the rest.
#[test]
fn exact_quotient_finds_exactly_the_multiples() {
    let page = PAGE_SIZE as u32;
    for class in 0..crate::geometry::SMALL_CLASSES as u32 {
        let d = (class + 1) * 16;
        let shift = d.trailing_zeros();
        let inverse = odd_inverse(d >> shift);
        assert_eq!((d >> shift).wrapping_mul(inverse), 1, "inverse of {d}");
        let met = (0..page).chain(page.wrapping_neg()..=u32::MAX);
        for n in met.chain((page..page.wrapping_neg()).step_by(65_521)) {
            let q = exact_quotient(n, inverse, shift);
            if n % d == 0 {
                assert_eq!(q, n / d, "{n} / {d}");
            } else {
                assert!(q > u32::MAX / d, "{n} / {d} gave {q}");
            }
        }
    }
}

/// `index_of` finds exactly the block starts: no other address of the
/// page (colour, header, size entries, requested sizes, the inside of a
/// block, the tail) passes for one, on pages of every class and span.
#[test]
fn index_of_accepts_exactly_the_block_starts() {
    for class in 0..crate::geometry::PAGE_CLASSES {
        let bytes = kinds::span(class) * PAGE_SIZE;
        let layout = std::alloc::Layout::from_size_align(bytes, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!mem.is_null());
        let bs = kinds::block_size(class) as usize;
        let colours: &[usize] = match kinds::is_medium(class) {
            true => &[COLOURS - 1],
            false => &[0, 7, COLOURS - 1],
        };
        for &n in colours {
            let offset = colour_offset(n);
            // SAFETY: the buffer is ours, `bytes` long, page-aligned.
            let page = Page(unsafe { mem.add(offset) });
            // SAFETY: as above.
            unsafe { page.init(class, 1, offset) };
            let h = page.header();
            let first = mem as usize + offset + h.data as usize;
            for at in 0..bytes {
                let a = mem as usize + at;
                let expected = (a >= first && (a - first) % bs == 0)
                    .then(|| ((a - first) / bs) as u32)
                    .filter(|&i| i < h.capacity);
                assert_eq!(
                    page.index_of(a as *const u8),
                    expected,
                    "class {class} colour {n} byte {at}"
                );
            }
        }
        // SAFETY: allocated above with `layout`.
        unsafe { std::alloc::dealloc(mem, layout) };
    }
}

/// A freed block's link overwritten with an offset past the page (a
/// program writing to a block after freeing it) does not make `pop`
/// reach outside the page: the rest of the list is dropped, and blocks
/// come from the never-used part.
#[test]
fn a_corrupted_link_stays_inside_the_page() {
    let layout = std::alloc::Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).unwrap();
    // SAFETY: non-zero size.
    let mem = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!mem.is_null());
    let page = Page(mem);
    // SAFETY: the buffer is ours, PAGE_SIZE bytes, page-aligned.
    unsafe { page.init(3, 1, 0) };
    let a = page.take(64).unwrap();
    let b = page.take(64).unwrap();
    let index = |p: NonNull<u8>| page.index_of(p.as_ptr()).unwrap();
    for p in [a, b] {
        page.size_entry(index(p)).store(FREE, Relaxed);
        page.push_local(p.as_ptr());
    }
    // `b` is the head; its link names `a`. Overwrite it.
    // SAFETY: `b` is a free block of the page, at least 4 bytes.
    unsafe { (b.as_ptr() as *mut u32).write(123_456) };
    assert_eq!(page.pop(64), Some(b));
    assert_eq!(page.pop(64), None, "the corrupted list is dropped");
    let c = page.take(64).unwrap();
    assert_eq!(index(c), EXTEND_BYTES / 64, "from the never-used part");
    let end = mem as usize + PAGE_SIZE;
    assert!((c.as_ptr() as usize) + 64 <= end);
    // SAFETY: allocated above with `layout`.
    unsafe { std::alloc::dealloc(mem, layout) };
}

#[test]
fn geometry_fits_the_page() {
    for class in 0..crate::geometry::PAGE_CLASSES {
        let bs = kinds::block_size(class) as usize;
        let (bytes, medium) = (kinds::span(class) * PAGE_SIZE, kinds::is_medium(class));
        for n in 0..COLOURS {
            let offset = colour_offset(n);
            let (cap, data) = kinds::geometry_of(class, offset);
            let cap = cap as usize;
            assert!(cap > 0 && data as usize % 16 == 0);
            let entries = if medium {
                requested_at(cap) + 4 * cap
            } else {
                HEADER_BYTES + cap
            };
            assert!(data as usize >= entries, "class {class}");
            let end = offset + data as usize + cap * bs;
            assert!(end <= bytes);
            // Nearly all of the page past the colour is used.
            assert!(
                bytes - end < bs + 16,
                "class {class} leaves {}",
                bytes - end
            );
        }
    }
}

/// A medium page keeps each block's requested size exactly, through
/// allocation, resizing and the census.
#[test]
fn a_medium_page_keeps_requested_sizes() {
    let class = kinds::medium_class(5);
    let bytes = kinds::span(class) * PAGE_SIZE;
    let layout = std::alloc::Layout::from_size_align(bytes, PAGE_SIZE).unwrap();
    // SAFETY: non-zero size.
    let mem = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!mem.is_null());
    // SAFETY: inside the buffer.
    let page = Page(unsafe { mem.add(colour_offset(0)) });
    // SAFETY: the buffer is ours, `bytes` long, page-aligned.
    unsafe { page.init(class, 1, colour_offset(0)) };
    let bs = kinds::block_size(class) as usize;
    let sizes = [bs, bs - 1, bs - 300, bs - 511];
    let blocks: Vec<_> = sizes.iter().map(|&s| page.take(s).unwrap()).collect();
    let index = |p: NonNull<u8>| page.index_of(p.as_ptr()).unwrap();
    for (p, &s) in blocks.iter().zip(&sizes) {
        let i = index(*p);
        assert_eq!(
            page.requested_of(i, page.size_entry(i).load(Relaxed)),
            s as u64
        );
    }
    assert_eq!(page.census(), (4, sizes.iter().sum::<usize>() as u64));
    page.set_requested(index(blocks[0]), 17);
    assert_eq!(
        page.census().1,
        (17 + sizes[1..].iter().sum::<usize>()) as u64
    );
    // SAFETY: allocated above with `layout`.
    unsafe { std::alloc::dealloc(mem, layout) };
}
