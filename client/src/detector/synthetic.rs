//! Synthetic batches for tests and benchmarks: bright rectangles ("defects") on a dark board in
//! channel 0, the same board without them in the other channels (the "template"), with
//! their boxes as annotations. Deterministic from a seed.

use fedinspect_common::detection::{Annotation, BBox, Letterbox};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Batch;

/// A `batch x channels x size x size` batch with `objects` rectangles per image, each 8 to
/// `size / 4` pixels a side, classes cycling through `0..classes`.
pub fn rectangles(
    batch: usize,
    channels: usize,
    size: usize,
    objects: usize,
    classes: u32,
    seed: u64,
) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let plane = size * size;
    let mut images = vec![0.2f32; batch * channels * plane];
    let mut annotations = Vec::with_capacity(batch);
    let max_side = (size / 4).max(9);
    for i in 0..batch {
        let mut anns = Vec::with_capacity(objects);
        for k in 0..objects {
            let (w, h) = (rng.gen_range(8..max_side), rng.gen_range(8..max_side));
            let (x0, y0) = (rng.gen_range(0..size - w), rng.gen_range(0..size - h));
            let img = &mut images[i * channels * plane..][..plane];
            for y in y0..y0 + h {
                img[y * size + x0..y * size + x0 + w].fill(1.0);
            }
            anns.push(Annotation {
                bbox: BBox::new(x0 as f32, y0 as f32, (x0 + w) as f32, (y0 + h) as f32),
                class: k as u32 % classes.max(1),
            });
        }
        annotations.push(anns);
    }
    Batch {
        images,
        batch,
        channels,
        height: size,
        width: size,
        annotations,
        letterboxes: vec![Letterbox::identity(size as u32, size as u32); batch],
        ids: (0..batch)
            .map(|i| format!("synthetic-{seed}-{i}"))
            .collect(),
    }
}
