//! Loaders and validation against the tiny fixtures in `tests/fixtures/data/`: the DeepPCB
//! layout (good and broken, one problem per broken item) and COCO JSON (good, broken, empty).

#[path = "fixtures/data/generate.rs"]
mod generate;

use std::path::PathBuf;

use fedinspect_client::data::coco::{self, CocoError, CocoOptions};
use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split};
use fedinspect_client::data::validate::Loaded;
use fedinspect_client::data::validate::{Finding, Issue, ValidationError};
use fedinspect_client::data::{validate, Channels, Dataset, Item, OnInvalid, ValidateOptions};
use fedinspect_common::detection::{Annotation, BBox};

fn fixtures(sub: &str) -> PathBuf {
    generate::root().join(sub)
}

fn options(on_invalid: OnInvalid) -> ValidateOptions {
    with_channels(Channels::GrayTemplate, on_invalid)
}

fn with_channels(channels: Channels, on_invalid: OnInvalid) -> ValidateOptions {
    ValidateOptions {
        channels,
        decode: true,
        on_invalid,
    }
}

/// The issues reported for loaded item `index`.
fn issues_of(findings: &[Finding], index: usize) -> Vec<&Issue> {
    findings
        .iter()
        .filter(|f| f.item == Some(index))
        .map(|f| &f.issue)
        .collect()
}

#[test]
fn deeppcb_split_loads_pairs_classes_and_groups() {
    let root = fixtures("deeppcb");
    let loaded = deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions::default()).unwrap();
    assert!(loaded.findings.is_empty(), "{:?}", loaded.findings);
    let ds = validate(loaded, &options(OnInvalid::Fail)).unwrap().dataset;
    assert_eq!(ds.class_names, deeppcb::CLASS_NAMES);
    assert_eq!(ds.len(), 3);
    let first = &ds.items[0];
    assert_eq!(first.id, "group00001/00001/00001000");
    assert_eq!(first.group, "group00001");
    assert_eq!(first.image, root.join("group00001/00001/00001000_test.jpg"));
    assert_eq!(
        first.template,
        Some(root.join("group00001/00001/00001000_temp.jpg"))
    );
    // Types 1 (open) and 3 (mousebite) become classes 0 and 2.
    let classes: Vec<u32> = first.annotations.iter().map(|a| a.class).collect();
    assert_eq!(classes, vec![0, 2]);
    assert_eq!(first.annotations[0].bbox, BBox::new(10.0, 12.0, 30.0, 28.0));
    assert_eq!(ds.groups(), vec!["group00001", "group00002"]);
    assert_eq!(ds.split_by_group()["group00001"].len(), 2);

    // test.txt has no trailing newline, like the real one.
    let test = deeppcb::load(&root, Split::Test, &DeepPcbOptions { template: false }).unwrap();
    assert_eq!(test.dataset.items[0].annotations[0].class, 3);
    assert_eq!(test.dataset.items[0].template, None);
}

#[test]
fn deeppcb_missing_split_file_says_where_to_point() {
    let err = deeppcb::load(
        &fixtures("nowhere"),
        Split::Test,
        &DeepPcbOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("PCBData"), "{err}");
}

#[test]
fn deeppcb_broken_items_each_get_their_entry() {
    let root = fixtures("deeppcb_broken");
    let loaded = deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions::default()).unwrap();
    let validated = validate(loaded, &options(OnInvalid::Skip)).unwrap();
    let report = &validated.report;
    let f = &report.findings;
    assert!(issues_of(f, 0).is_empty(), "{:?}", issues_of(f, 0));
    assert!(
        matches!(issues_of(f, 1)[0], Issue::MissingImage { path } if path.ends_with("00001001_test.jpg"))
    );
    assert!(matches!(
        issues_of(f, 2)[..],
        [Issue::BoxOutsideImage {
            index: 0,
            width: 64,
            height: 64,
            ..
        }]
    ));
    assert!(matches!(
        issues_of(f, 3)[..],
        [Issue::UnknownCategory { category: 9 }]
    ));
    assert!(matches!(
        issues_of(f, 4)[..],
        [Issue::EmptyAnnotationFile { .. }]
    ));
    assert!(matches!(
        issues_of(f, 5)[..],
        [Issue::TemplateSizeMismatch {
            image: (64, 64),
            template: (32, 32)
        }]
    ));
    assert!(matches!(
        issues_of(f, 6)[..],
        [Issue::UnreadableImage { .. }]
    ));
    assert!(matches!(
        issues_of(f, 7)[..],
        [Issue::UnparseableAnnotation { line: 1, .. }]
    ));
    assert!(matches!(
        issues_of(f, 8)[..],
        [Issue::MissingAnnotationFile { .. }]
    ));
    assert!(
        matches!(&issues_of(f, 9)[..], [Issue::DuplicateId { first }] if first == "group00001/00001/00001000")
    );
    assert!(f
        .iter()
        .any(|x| x.item.is_none() && matches!(x.issue, Issue::BadSplitLine { line: 10, .. })));

    // Skipping keeps only the good pair (its duplicate goes too).
    assert_eq!(validated.dataset.len(), 1);
    assert_eq!(validated.dataset.items[0].id, "group00001/00001/00001000");
    assert_eq!(report.skipped, 9);

    // The text names every offending item and says what to do.
    let text = report.to_string();
    assert!(
        text.starts_with(
            "checked 10 items: 9 with problems were skipped, 1 remain; 1 more outside any item"
        ),
        "{text}"
    );
    assert!(
        text.contains("group00001/00001/00001003: uses unknown category 9"),
        "{text}"
    );
    assert!(text.contains("lies outside the 64x64 image"), "{text}");
    assert_eq!(text.lines().count(), 1 + f.len());
}

#[test]
fn deeppcb_broken_fails_without_skip() {
    let root = fixtures("deeppcb_broken");
    let loaded = deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions::default()).unwrap();
    let err = validate(loaded, &options(OnInvalid::Fail)).unwrap_err();
    let ValidationError::Invalid(report) = &err else {
        panic!("expected Invalid, got {err}");
    };
    assert_eq!(report.skipped, 0);
    assert!(
        err.to_string().contains("skip the offending items"),
        "{err}"
    );
}

#[test]
fn one_channel_does_not_need_templates() {
    // Pair 5's template has the wrong size, which only matters for 2-channel input.
    let root = fixtures("deeppcb_broken");
    let loaded = deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions::default()).unwrap();
    let report = validate(loaded, &with_channels(Channels::Gray, OnInvalid::Skip))
        .unwrap()
        .report;
    assert!(issues_of(&report.findings, 5).is_empty());
}

#[test]
fn coco_maps_categories_and_boxes() {
    let json = fixtures("coco/instances.json");
    let loaded = coco::load(&json, &CocoOptions::default()).unwrap();
    assert_eq!(loaded.notes.len(), 1, "one iscrowd box is noted");
    let ds = validate(loaded, &with_channels(Channels::Rgb, OnInvalid::Fail))
        .unwrap()
        .dataset;
    // Category ids 3 and 7 become classes 0 and 1, in id order.
    assert_eq!(ds.class_names, vec!["scratch", "dent"]);
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.items[0].id, "images/a.jpg");
    assert_eq!(ds.items[0].group, "instances");
    assert_eq!(ds.items[0].image, fixtures("coco/images/a.jpg"));
    assert_eq!(ds.items[0].annotations[0].class, 0);
    assert_eq!(
        ds.items[0].annotations[0].bbox,
        BBox::new(4.0, 4.0, 20.0, 16.0)
    );
    assert_eq!(ds.items[1].annotations[0].class, 1);
    assert!(
        ds.items[2].annotations.is_empty(),
        "an image without defects is fine in COCO"
    );
}

#[test]
fn coco_broken_items_each_get_their_entry() {
    let json = fixtures("coco/broken.json");
    let loaded = coco::load(&json, &CocoOptions::default()).unwrap();
    let validated = validate(loaded, &with_channels(Channels::Rgb, OnInvalid::Skip)).unwrap();
    let f = &validated.report.findings;
    assert!(issues_of(f, 0).is_empty());
    assert!(matches!(issues_of(f, 1)[..], [Issue::MissingImage { .. }]));
    assert!(matches!(
        issues_of(f, 2)[..],
        [Issue::BoxOutsideImage {
            width: 64,
            height: 48,
            ..
        }]
    ));
    assert!(matches!(
        issues_of(f, 3)[..],
        [Issue::UnknownCategory { category: 99 }]
    ));
    assert!(matches!(
        issues_of(f, 4)[..],
        [Issue::DeclaredSizeMismatch {
            declared: (128, 96),
            actual: (64, 48)
        }]
    ));
    assert!(f
        .iter()
        .any(|x| x.item.is_none() && matches!(x.issue, Issue::UnknownImage { image_id: 42 })));
    assert_eq!(validated.dataset.len(), 1);
}

#[test]
fn coco_empty_file_is_an_error() {
    let err = coco::load(&fixtures("coco/empty.json"), &CocoOptions::default()).unwrap_err();
    assert!(matches!(err, CocoError::Empty { .. }));
    let err = coco::load(&fixtures("coco/none.json"), &CocoOptions::default()).unwrap_err();
    assert!(matches!(err, CocoError::Read { .. }));
}

#[test]
fn datasets_built_in_code_are_checked_too() {
    let ann = |class, x1, y1, x2, y2| Annotation {
        bbox: BBox::new(x1, y1, x2, y2),
        class,
    };
    let item = Item {
        id: "line-3/cam-1/0001".into(),
        group: "line-3".into(),
        image: fixtures("coco/images/a.jpg"),
        template: None,
        annotations: vec![
            ann(0, 4.0, 4.0, 20.0, 16.0),
            ann(0, 5.0, 5.0, 5.0, 10.0),
            ann(7, 1.0, 1.0, 3.0, 3.0),
            ann(0, 60.0, 40.0, 64.5, 48.5), // half a pixel out: within tolerance
        ],
    };
    let ds = Dataset {
        class_names: vec!["scratch".into()],
        items: vec![item],
    };
    let err = validate(
        Loaded::from(ds),
        &with_channels(Channels::Gray, OnInvalid::Skip),
    )
    .unwrap_err();
    let ValidationError::NothingLeft(report) = err else {
        panic!("expected NothingLeft, got {err}");
    };
    assert!(matches!(
        issues_of(&report.findings, 0)[..],
        [
            Issue::DegenerateBox { index: 1, .. },
            Issue::ClassOutOfRange {
                class: 7,
                classes: 1
            }
        ] | [
            Issue::ClassOutOfRange {
                class: 7,
                classes: 1
            },
            Issue::DegenerateBox { index: 1, .. }
        ]
    ));
}
