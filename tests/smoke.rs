use matrix_alloc::Matrix;
use std::alloc::Layout;
#[test]
fn smoke() {
    let m = Matrix::anonymous(1 << 20).unwrap();
    let r0 = m.check().unwrap();
    println!("{r0:?}");
    let mut ps = vec![];
    for i in 0..1000 { ps.push(m.alloc(Layout::from_size_align(16 + i % 200, 8).unwrap()).unwrap()); }
    m.check().unwrap();
    for p in ps.drain(..).rev() { unsafe { m.free(p).unwrap() } }
    let r = m.check().unwrap();
    println!("{r:?}");
    assert_eq!(r.free_blocks, 1);
}
