//! cpuspin: burns CPU until something stops it.

use plugin_runner::{Methods, Plugin};

struct Spin;

impl Plugin for Spin {
    fn methods(m: &mut Methods<Self>) {
        m.typed("spin", |_, _: ()| -> Result<u64, String> {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
    }
}

fn main() {
    plugin_runner::serve(Spin)
}
