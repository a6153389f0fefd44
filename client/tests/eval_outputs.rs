//! Evaluation outputs: the PR plot and annotated images are valid PNGs of the expected size
//! with something drawn on them, and the detections JSON round-trips with names and ids.

use fedinspect_client::data::{Dataset, Item};
use fedinspect_client::eval::export::{self, DetectionsFile};
use fedinspect_client::eval::{self, map, plot};
use fedinspect_common::detection::{Annotation, BBox, Detection};
use image::{GenericImageView, Rgb, RgbImage};

fn sample() -> (Vec<Vec<Detection>>, Vec<Vec<Annotation>>, Vec<String>) {
    let gts = vec![vec![
        Annotation {
            bbox: BBox::new(10.0, 10.0, 30.0, 30.0),
            class: 0,
        },
        Annotation {
            bbox: BBox::new(40.0, 40.0, 60.0, 50.0),
            class: 1,
        },
    ]];
    let dets = vec![vec![
        Detection {
            bbox: BBox::new(11.0, 10.0, 30.0, 31.0),
            class: 0,
            score: 0.9,
        },
        Detection {
            bbox: BBox::new(0.0, 50.0, 8.0, 60.0),
            class: 1,
            score: 0.6,
        },
        Detection {
            bbox: BBox::new(40.0, 40.0, 61.0, 50.0),
            class: 1,
            score: 0.4,
        },
    ]];
    (dets, gts, vec!["open".into(), "spurious_copper".into()])
}

#[test]
fn pr_plot_is_a_png_of_the_requested_size() {
    let (dets, gts, names) = sample();
    let curves = map::curves(&dets, &gts, 2, 0.5);
    assert_eq!(curves[1].recall, vec![0.0, 1.0]);
    assert_eq!(curves[1].precision, vec![0.0, 0.5]);
    let png = plot::pr_plot_png(&curves, &names, "PR at IoU > 0.5", 480, 320).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!(img.dimensions(), (480, 320));
    // Both class colours appear (curves and legend).
    let rgb = img.to_rgb8();
    for c in 0..2 {
        let color = eval::draw::class_color(c);
        assert!(
            rgb.pixels().any(|p| *p == color),
            "class {c} colour missing"
        );
    }
    assert!(plot::pr_plot_png(&curves, &names, "x", 100, 100).is_err());
}

#[test]
fn pr_plot_is_saved_to_a_file() {
    let (dets, gts, names) = sample();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pr.png");
    plot::save_pr_plot(
        &path,
        &map::curves(&dets, &gts, 2, 0.33),
        &names,
        "PR",
        300,
        200,
    )
    .unwrap();
    assert_eq!(image::open(&path).unwrap().dimensions(), (300, 200));
}

#[test]
fn annotated_image_marks_ground_truth_and_detections() {
    let (dets, gts, names) = sample();
    let dark = RgbImage::from_pixel(64, 64, Rgb([10, 10, 10]));
    let out = export::annotate(&dark, &gts[0], &dets[0], &names, 0.5);
    assert_eq!(out.dimensions(), (64, 64));
    // The ground-truth outline is green on its left edge; the 0.9 detection is drawn in its
    // class colour; the 0.4 one is below the score threshold and not drawn.
    assert_eq!(*out.get_pixel(10, 20), export::GROUND_TRUTH_COLOR);
    assert_eq!(*out.get_pixel(12, 25), eval::draw::class_color(0));
    assert_eq!(*out.get_pixel(60, 45), Rgb([10, 10, 10]));

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("board.png");
    dark.save(&src).unwrap();
    let dst = dir.path().join("board_annotated.png");
    export::save_annotated(&src, &gts[0], &dets[0], &names, 0.5, &dst).unwrap();
    assert_eq!(image::open(&dst).unwrap().dimensions(), (64, 64));
}

#[test]
fn detections_json_names_images_and_classes() {
    let (dets, _, names) = sample();
    let file = export::detections_file(&["board-1".to_string()], &dets, &names).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detections.json");
    export::write_detections_json(&path, &file).unwrap();
    let back: DetectionsFile =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, file);
    let first = &back.images[0].detections[0];
    assert_eq!(
        (back.images[0].id.as_str(), first.class_name.as_str()),
        ("board-1", "open")
    );
    assert_eq!(first.bbox, [11.0, 10.0, 30.0, 31.0]);
    assert!(export::detections_file(&[], &dets, &names).is_err());
}

#[test]
fn detections_align_to_dataset_order_and_missing_images_count_as_misses() {
    let item = |id: &str| Item {
        id: id.into(),
        group: "g".into(),
        image: id.into(),
        template: None,
        annotations: vec![Annotation {
            bbox: BBox::new(0.0, 0.0, 5.0, 5.0),
            class: 0,
        }],
    };
    let ds = Dataset {
        class_names: vec!["a".into()],
        items: vec![item("x"), item("y")],
    };
    let hit = Detection {
        bbox: BBox::new(0.0, 0.0, 5.0, 5.0),
        class: 0,
        score: 1.0,
    };
    let aligned = eval::align_detections(&ds, [("y".to_string(), vec![hit])]);
    assert_eq!(aligned, vec![vec![], vec![hit]]);
    let r = eval::evaluate(&aligned, &ds.ground_truth(), &ds.class_names, 0.5, 0.0).unwrap();
    assert_eq!(r.recall_33, 0.5);
}
