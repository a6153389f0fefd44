//! Augmentation and the batch loader: boxes follow the pixels under every crop, flip and
//! rotation; the same seed gives the same batches; evaluation batches letterbox whole images;
//! an image that fails to decode is skipped, not a panic.

use fedinspect_client::data::augment::{self, Augment, Draw};
use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split};
use fedinspect_client::data::geometry;
use fedinspect_client::data::loader::{Loader, LoaderError, LoaderOptions};
use fedinspect_client::data::planes::{Planes, PAD_VALUE};
use fedinspect_client::data::{Batch, Channels, Dataset, Preprocess};
use fedinspect_common::detection::{Annotation, BBox};

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn deeppcb_train() -> Dataset {
    let root = fixtures().join("deeppcb");
    deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions::default())
        .unwrap()
        .dataset
}

fn pre(size: u32) -> Preprocess {
    Preprocess {
        input_size: size,
        channels: Channels::GrayTemplate,
        clahe: None,
    }
}

fn heavy_augment() -> Augment {
    Augment {
        crop_size: 32,
        hflip: true,
        vflip: true,
        rot90: true,
        brightness: 0.1,
        contrast: 0.2,
        noise_std: 0.05,
    }
}

fn opts(batch_size: usize, seed: u64) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        seed,
        ..LoaderOptions::default()
    }
}

/// Bright pixels (>= 128) must all have their centre inside the box, and every pixel whose
/// centre is at least one pixel inside the box must be bright.
fn assert_box_matches_pixels(p: &Planes, b: &BBox, what: &str) {
    for c in 0..p.channels {
        for y in 0..p.height {
            for x in 0..p.width {
                let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
                let inside = cx > b.x1 && cx < b.x2 && cy > b.y1 && cy < b.y2;
                let deep = cx > b.x1 + 1.0 && cx < b.x2 - 1.0 && cy > b.y1 + 1.0 && cy < b.y2 - 1.0;
                let bright = p.get(c, x, y) >= 128;
                assert!(!bright || inside, "{what}: bright ({x}, {y}) outside {b:?}");
                assert!(!deep || bright, "{what}: dark ({x}, {y}) inside {b:?}");
            }
        }
    }
}

#[test]
fn boxes_follow_pixels_under_every_crop_flip_and_rotation() {
    // 64x64, two channels, one bright defect at x 10..30, y 20..28.
    let mut planes = Planes::filled(64, 64, 2, 30);
    for c in 0..2 {
        for y in 20..28 {
            for x in 10..30 {
                planes.plane_mut(c)[y * 64 + x] = 230;
            }
        }
    }
    let defect = Annotation {
        bbox: BBox::new(10.0, 20.0, 30.0, 28.0),
        class: 1,
    };
    for (x0, y0) in [(0, 0), (4, 12), (8, 8)] {
        for bits in 0..16u8 {
            let draw = Draw {
                x0,
                y0,
                hflip: bits & 1 != 0,
                vflip: bits & 2 != 0,
                quarter_turns: bits >> 2,
                brightness: 0.0,
                contrast: 1.0,
                noise_std: 0.0,
            };
            let (p, anns) = augment::apply_geometry(&planes, &[defect], 32, &draw);
            assert_eq!((p.width, p.height, p.channels), (32, 32, 2));
            assert_eq!(anns.len(), 1, "{draw:?}");
            assert_eq!(anns[0].class, 1);
            assert_box_matches_pixels(&p, &anns[0].bbox, &format!("{draw:?}"));
        }
    }
}

#[test]
fn crop_drops_boxes_whose_centre_is_outside() {
    let planes = Planes::filled(64, 64, 1, 0);
    let a = Annotation {
        bbox: BBox::new(28.0, 0.0, 40.0, 8.0), // centre x 34: outside a 32 crop at x0 = 0
        class: 0,
    };
    let (_, kept) = geometry::crop(&planes, &[a], 0, 0, 32);
    assert!(kept.is_empty());
    let (_, kept) = geometry::crop(&planes, &[a], 4, 0, 32);
    assert_eq!(
        kept[0].bbox,
        BBox::new(24.0, 0.0, 32.0, 8.0),
        "clipped to the crop"
    );
}

fn epoch(loader: &Loader, e: u64) -> Vec<Batch> {
    loader.train_epoch(e).collect()
}

fn same(a: &[Batch], b: &[Batch]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.images == y.images
                && x.annotations == y.annotations
                && x.ids == y.ids
                && x.letterboxes == y.letterboxes
        })
}

#[test]
fn same_seed_gives_identical_batches() {
    let make =
        |seed| Loader::new(deeppcb_train(), pre(64), heavy_augment(), opts(1, seed)).unwrap();
    let (a, b) = (make(7), make(7));
    let first = epoch(&a, 0);
    assert_eq!(first.len(), 3);
    assert!(same(&first, &epoch(&b, 0)), "same seed and epoch");
    assert!(
        same(&first, &epoch(&a, 0)),
        "replaying an epoch from the cache"
    );
    assert!(!same(&first, &epoch(&a, 1)), "another epoch differs");
    assert!(!same(&first, &epoch(&make(8), 0)), "another seed differs");
    let seeded: Vec<Batch> = make(8).train_epoch_with_seed(7, 0).collect();
    assert!(
        same(&first, &seeded),
        "an explicit seed overrides the options"
    );
}

#[test]
fn training_batches_have_the_crop_shape_and_unit_range() {
    let loader = Loader::new(deeppcb_train(), pre(64), heavy_augment(), opts(2, 1)).unwrap();
    assert_eq!(loader.batches_per_epoch(), 1);
    let batches = epoch(&loader, 0);
    assert_eq!(batches.len(), 1, "the partial batch is dropped");
    let b = &batches[0];
    assert_eq!((b.batch, b.channels, b.height, b.width), (2, 2, 32, 32));
    assert_eq!(b.images.len(), 2 * 2 * 32 * 32);
    assert!(b.images.iter().all(|v| (0.0..=1.0).contains(v)));
    for anns in &b.annotations {
        assert!(anns
            .iter()
            .all(|a| a.bbox.x1 >= 0.0 && a.bbox.x2 <= 32.0 && a.bbox.y2 <= 32.0));
    }
}

#[test]
fn eval_batches_letterbox_whole_images() {
    let ds = deeppcb_train();
    let original = ds.items[0].annotations.clone();
    let loader = Loader::new(ds, pre(128), Augment::none(128), opts(2, 0)).unwrap();
    let batches: Vec<Batch> = loader.eval_batches().collect();
    assert_eq!(
        batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
        vec![2, 1],
        "last batch short"
    );
    let b = &batches[0];
    assert_eq!((b.channels, b.height, b.width), (2, 128, 128));
    assert_eq!(b.ids[0], "group00001/00001/00001000");
    let lb = b.letterboxes[0];
    assert_eq!(lb.scale, 2.0);
    // Input-coordinate boxes map back to the file's boxes, and the defect is bright there.
    for (a, o) in b.annotations[0].iter().zip(&original) {
        assert_eq!(lb.to_original(&a.bbox), o.bbox);
        let (x, y) = (
            ((a.bbox.x1 + a.bbox.x2) / 2.0) as usize,
            ((a.bbox.y1 + a.bbox.y2) / 2.0) as usize,
        );
        let test = b.images[y * 128 + x];
        let template = b.images[128 * 128 + y * 128 + x];
        assert!(
            test > 0.7 && template < 0.3,
            "test {test} template {template}"
        );
    }
}

#[test]
fn non_square_images_are_padded_mid_grey() {
    let json = fixtures().join("coco/instances.json");
    let ds = fedinspect_client::data::coco::load(&json, &Default::default())
        .unwrap()
        .dataset;
    let pre = Preprocess {
        input_size: 64,
        channels: Channels::Rgb,
        clahe: None,
    };
    let loader = Loader::new(ds, pre, Augment::none(64), opts(4, 0)).unwrap();
    let b = loader.eval_batches().next().unwrap();
    assert_eq!((b.batch, b.channels), (3, 3));
    // 64x48 fits 64x64 with 8 rows of padding above and below.
    assert_eq!(b.letterboxes[0].pad_y, 8.0);
    assert_eq!(b.annotations[0][0].bbox, BBox::new(4.0, 12.0, 20.0, 24.0));
    assert_eq!(b.images[0], f32::from(PAD_VALUE) / 255.0);
}

#[test]
fn undecodable_image_is_skipped_not_fatal() {
    let root = fixtures().join("deeppcb_broken");
    let loaded = deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions::default()).unwrap();
    // Item 0 is good; item 6's test image is not a JPEG. No validation on purpose.
    let items = vec![
        loaded.dataset.items[6].clone(),
        loaded.dataset.items[0].clone(),
    ];
    let bad_id = items[0].id.clone();
    let ds = Dataset {
        class_names: loaded.dataset.class_names,
        items,
    };
    let loader = Loader::new(ds, pre(64), heavy_augment(), opts(1, 0)).unwrap();
    let eval: Vec<Batch> = loader.eval_batches().collect();
    assert_eq!(eval.len(), 1);
    assert_eq!(eval[0].ids, vec!["group00001/00001/00001000"]);
    assert_eq!(epoch(&loader, 0).len(), 1);
    let skipped = loader.skipped();
    assert_eq!(skipped.len(), 1, "logged once across epochs");
    assert_eq!(skipped[0].id, bad_id);
    assert!(
        skipped[0].reason.contains("cannot decode"),
        "{}",
        skipped[0].reason
    );
}

#[test]
fn dropping_an_epoch_early_stops_the_producer() {
    let mut ds = deeppcb_train();
    let items = ds.items.clone();
    for _ in 0..20 {
        ds.items.extend(items.iter().cloned());
    }
    let options = LoaderOptions {
        prefetch: 1,
        cache: false,
        ..opts(1, 0)
    };
    let loader = Loader::new(ds, pre(64), Augment::none(64), options).unwrap();
    let mut batches = loader.train_epoch(0);
    assert!(batches.next().is_some());
    drop(batches); // must return promptly: the producer sees the hang-up
}

#[test]
fn bad_settings_are_refused() {
    let bad_crop = Augment {
        crop_size: 48,
        ..Augment::default()
    };
    let err = Loader::new(deeppcb_train(), pre(64), bad_crop, opts(1, 0))
        .err()
        .unwrap();
    assert!(matches!(err, LoaderError::Augment(_)), "{err}");
    let err = Loader::new(deeppcb_train(), pre(64), Augment::none(64), opts(0, 0))
        .err()
        .unwrap();
    assert!(matches!(err, LoaderError::Zero));
}

/// Manual measurement, not a check: batches of eight 320 crops per second on DeepPCB train.
/// `taskset -c 0 scripts/cargo test --release -p fedinspect-client --test data_augment --
/// --ignored --nocapture throughput` (set FEDINSPECT_DEEPPCB to the PCBData folder if it is
/// not at ../shared/datasets/deeppcb/PCBData).
#[test]
#[ignore = "manual throughput measurement on the real DeepPCB data"]
fn throughput() {
    let root = std::env::var_os("FEDINSPECT_DEEPPCB")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/datasets/deeppcb/PCBData")
        });
    let ds = deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions::default())
        .unwrap()
        .dataset;
    let jitter = Augment {
        crop_size: 320,
        ..heavy_augment()
    };
    for (name, augment, cache) in [
        ("baseline flips, cached", Augment::default(), true),
        ("rot90 + jitter + noise, cached", jitter, true),
        (
            "baseline flips, decoded every time",
            Augment::default(),
            false,
        ),
    ] {
        let options = LoaderOptions {
            cache,
            ..opts(8, 0)
        };
        let loader = Loader::new(ds.clone(), pre(640), augment, options).unwrap();
        for e in 0..2 {
            let t = std::time::Instant::now();
            let n = loader.train_epoch(e).count();
            let s = t.elapsed().as_secs_f64();
            println!(
                "{name}, epoch {e}: {n} batches in {s:.2} s = {:.1} batches/s",
                n as f64 / s
            );
        }
    }
}
