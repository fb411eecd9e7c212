//! memhog: allocates and touches memory until something stops it.

use plugin_runner::{Methods, Plugin};

#[derive(Default)]
struct MemHog {
    held: Vec<Vec<u8>>,
}

impl Plugin for MemHog {
    fn methods(m: &mut Methods<Self>) {
        m.typed("hog", |me: &mut MemHog, mib_per_step: u64| -> Result<u64, String> {
            loop {
                let mut block = vec![0u8; (mib_per_step.max(1) << 20) as usize];
                // Touch every page so the memory is really resident.
                for i in (0..block.len()).step_by(4096) {
                    block[i] = 1;
                }
                me.held.push(block);
            }
        });
        m.typed("held_mib", |me: &mut MemHog, _: ()| -> Result<usize, String> {
            Ok(me.held.iter().map(|b| b.len()).sum::<usize>() >> 20)
        });
    }
}

fn main() {
    plugin_runner::serve(MemHog::default())
}
