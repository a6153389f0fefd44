//! Dataset checks before training: every problem with every item found in one pass and listed
//! in a [`ValidationReport`] a plant engineer can read, then either a refusal or the clean
//! dataset with the offending items skipped.
//!
//! Loaders report what they saw while parsing (bad annotation lines, unknown categories,
//! duplicate ids) as [`Finding`]s in [`Loaded`]; [`validate`] adds what needs the files
//! (missing or unreadable images, template size, boxes outside the image) and decides.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;

use fedinspect_common::detection::BBox;

use super::augment::Channels;
use super::planes::{self, ImageError};
use super::{Dataset, Item};

/// How far (pixels) a box may stick out of its image before it counts as outside: exporters
/// round, and a box ending at `640.4` on a 640-pixel image is fine (augmentation clips it).
pub const OUTSIDE_TOLERANCE: f32 = 1.0;

/// What a loader produced, before validation.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub dataset: Dataset,
    /// Problems seen while parsing.
    pub findings: Vec<Finding>,
    /// Remarks that are not problems (e.g. how COCO crowd boxes were treated).
    pub notes: Vec<String>,
    /// Image sizes the annotation file declares, per item, to compare with the real files.
    pub declared_sizes: Vec<Option<(u32, u32)>>,
}

/// One problem: with the item it concerns (index into the loaded items) when there is one.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub item: Option<usize>,
    /// The item's id, or where the problem is (a file and line) when there is no item.
    pub id: String,
    pub issue: Issue,
}

/// Every kind of problem, each saying what to do in its `Display`.
#[derive(Clone, Debug, PartialEq)]
pub enum Issue {
    MissingImage {
        path: PathBuf,
    },
    MissingTemplate {
        path: PathBuf,
    },
    /// The model reads image + template but the item has no template.
    NoTemplate,
    UnreadableImage {
        path: PathBuf,
        reason: String,
    },
    TemplateSizeMismatch {
        image: (u32, u32),
        template: (u32, u32),
    },
    DeclaredSizeMismatch {
        declared: (u32, u32),
        actual: (u32, u32),
    },
    BoxOutsideImage {
        index: usize,
        bbox: BBox,
        width: u32,
        height: u32,
    },
    DegenerateBox {
        index: usize,
        bbox: BBox,
    },
    UnknownCategory {
        category: i64,
    },
    ClassOutOfRange {
        class: u32,
        classes: usize,
    },
    MissingAnnotationFile {
        path: PathBuf,
    },
    EmptyAnnotationFile {
        path: PathBuf,
    },
    UnparseableAnnotation {
        path: PathBuf,
        line: usize,
        text: String,
    },
    /// A split-file line that names no image pair.
    BadSplitLine {
        path: PathBuf,
        line: usize,
        text: String,
    },
    /// The same item id (or COCO image id) appears again; the first occurrence is kept.
    DuplicateId {
        first: String,
    },
    DuplicateAnnotationId {
        annotation: i64,
    },
    /// A COCO annotation points at an image id the file does not list; it is dropped.
    UnknownImage {
        image_id: i64,
    },
    /// A COCO annotation without a usable `bbox`.
    BadBbox {
        annotation: Option<i64>,
        reason: String,
    },
}

/// What to do with offending items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnInvalid {
    /// Refuse the dataset if anything is wrong.
    Fail,
    /// Drop every item with a problem and train on the rest.
    Skip,
}

#[derive(Clone, Debug)]
pub struct ValidateOptions {
    /// The channels the model will read: templates are only checked (and required) for
    /// [`Channels::GrayTemplate`].
    pub channels: Channels,
    /// Decode every image fully (catches corrupt pixel data; DeepPCB train takes a few
    /// seconds) instead of reading only the headers.
    pub decode: bool,
    pub on_invalid: OnInvalid,
}

/// Everything found, and what was done about it.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidationReport {
    /// Items the loader produced.
    pub items: usize,
    pub findings: Vec<Finding>,
    pub notes: Vec<String>,
    /// Items dropped (only with [`OnInvalid::Skip`]).
    pub skipped: usize,
    pub policy: OnInvalid,
}

/// The dataset that passed, and the report of what was skipped to get there.
#[derive(Clone, Debug)]
pub struct Validated {
    pub dataset: Dataset,
    pub report: ValidationReport,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("the dataset has problems; fix them, or skip the offending items\n{0}")]
    Invalid(ValidationReport),
    #[error("no usable items are left after skipping the offending ones; fix the dataset\n{0}")]
    NothingLeft(ValidationReport),
}

impl From<Dataset> for Loaded {
    /// A dataset built in code, to validate with no parse findings.
    fn from(dataset: Dataset) -> Self {
        let n = dataset.items.len();
        Self {
            dataset,
            findings: Vec::new(),
            notes: Vec::new(),
            declared_sizes: vec![None; n],
        }
    }
}

impl ValidationReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// Indices of the loaded items that have at least one finding.
    pub fn offending_items(&self) -> BTreeSet<usize> {
        self.findings.iter().filter_map(|f| f.item).collect()
    }
}

/// Checks every item of `loaded` and applies `options.on_invalid`.
pub fn validate(loaded: Loaded, options: &ValidateOptions) -> Result<Validated, ValidationError> {
    let Loaded {
        dataset,
        mut findings,
        notes,
        declared_sizes,
    } = loaded;
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    for (index, item) in dataset.items.iter().enumerate() {
        if let Some(&first) = first_index.get(item.id.as_str()) {
            let first = dataset.items[first].id.clone();
            findings.push(finding(index, item, Issue::DuplicateId { first }));
        } else {
            first_index.insert(&item.id, index);
        }
        let declared = declared_sizes.get(index).copied().flatten();
        for issue in check_item(item, dataset.class_names.len(), declared, options) {
            findings.push(finding(index, item, issue));
        }
    }
    findings.sort_by_key(|f| f.item.unwrap_or(usize::MAX));
    let mut report = ValidationReport {
        items: dataset.items.len(),
        findings,
        notes,
        skipped: 0,
        policy: options.on_invalid,
    };
    if report.is_clean() {
        return Ok(Validated { dataset, report });
    }
    if options.on_invalid == OnInvalid::Fail {
        return Err(ValidationError::Invalid(report));
    }
    let bad = report.offending_items();
    let Dataset { class_names, items } = dataset;
    let items: Vec<Item> = items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !bad.contains(i))
        .map(|(_, item)| item)
        .collect();
    report.skipped = report.items - items.len();
    if items.is_empty() {
        return Err(ValidationError::NothingLeft(report));
    }
    Ok(Validated {
        dataset: Dataset { class_names, items },
        report,
    })
}

fn finding(index: usize, item: &Item, issue: Issue) -> Finding {
    Finding {
        item: Some(index),
        id: item.id.clone(),
        issue,
    }
}

fn check_item(
    item: &Item,
    classes: usize,
    declared: Option<(u32, u32)>,
    options: &ValidateOptions,
) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (index, a) in item.annotations.iter().enumerate() {
        if a.class as usize >= classes {
            issues.push(Issue::ClassOutOfRange {
                class: a.class,
                classes,
            });
        }
        let b = a.bbox;
        let finite = [b.x1, b.y1, b.x2, b.y2].iter().all(|v| v.is_finite());
        if !finite || b.x2 <= b.x1 || b.y2 <= b.y1 {
            issues.push(Issue::DegenerateBox { index, bbox: b });
        }
    }
    let size = match check_file(&item.image, options.decode, false) {
        Ok(size) => Some(size),
        Err(issue) => {
            issues.push(issue);
            None
        }
    };
    if options.channels == Channels::GrayTemplate {
        match &item.template {
            None => issues.push(Issue::NoTemplate),
            Some(path) => match (check_file(path, options.decode, true), size) {
                (Err(issue), _) => issues.push(issue),
                (Ok(t), Some(s)) if t != s => issues.push(Issue::TemplateSizeMismatch {
                    image: s,
                    template: t,
                }),
                _ => {}
            },
        }
    }
    let Some((w, h)) = size else {
        return issues;
    };
    if let Some(declared) = declared.filter(|&d| d != (w, h)) {
        issues.push(Issue::DeclaredSizeMismatch {
            declared,
            actual: (w, h),
        });
    }
    let (fw, fh, t) = (w as f32, h as f32, OUTSIDE_TOLERANCE);
    for (index, a) in item.annotations.iter().enumerate() {
        let b = a.bbox;
        if b.x1 < -t || b.y1 < -t || b.x2 > fw + t || b.y2 > fh + t {
            issues.push(Issue::BoxOutsideImage {
                index,
                bbox: b,
                width: w,
                height: h,
            });
        }
    }
    issues
}

fn check_file(path: &std::path::Path, decode: bool, template: bool) -> Result<(u32, u32), Issue> {
    if !path.is_file() {
        let path = path.to_path_buf();
        return Err(if template {
            Issue::MissingTemplate { path }
        } else {
            Issue::MissingImage { path }
        });
    }
    let result = if decode {
        planes::decode_file(path).map(|i| (i.width(), i.height()))
    } else {
        planes::read_dimensions(path)
    };
    result.map_err(|e| Issue::UnreadableImage {
        path: path.to_path_buf(),
        reason: match e {
            ImageError::Open { source, .. } => source.to_string(),
            ImageError::Decode { reason, .. } => reason,
            other => other.to_string(),
        },
    })
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = |b: &BBox| format!("({}, {})-({}, {})", b.x1, b.y1, b.x2, b.y2);
        match self {
            Issue::MissingImage { path } => write!(f, "image file {} is missing; restore it or remove the item from the dataset", path.display()),
            Issue::MissingTemplate { path } => write!(f, "template file {} is missing; restore it, or train without templates", path.display()),
            Issue::NoTemplate => write!(f, "has no template but the model reads image + template; add the template or train on 1 channel"),
            Issue::UnreadableImage { path, reason } => write!(f, "image file {} cannot be read ({reason}); re-export it as jpg or png", path.display()),
            Issue::TemplateSizeMismatch { image, template } => write!(f, "template is {}x{} but the image is {}x{}; templates must be aligned captures of the same size", template.0, template.1, image.0, image.1),
            Issue::DeclaredSizeMismatch { declared, actual } => write!(f, "annotation file says the image is {}x{} but the file is {}x{}; boxes may be scaled wrongly, re-export the annotations", declared.0, declared.1, actual.0, actual.1),
            Issue::BoxOutsideImage { index, bbox, width, height } => write!(f, "box {} {} lies outside the {width}x{height} image; fix the annotation", index + 1, b(bbox)),
            Issue::DegenerateBox { index, bbox } => write!(f, "box {} {} has no area; fix or delete the annotation", index + 1, b(bbox)),
            Issue::UnknownCategory { category } => write!(f, "uses unknown category {category}; add the category or correct the label"),
            Issue::ClassOutOfRange { class, classes } => write!(f, "uses class {class} but the dataset has only {classes} classes; correct the label"),
            Issue::MissingAnnotationFile { path } => write!(f, "annotation file {} is missing; restore it or remove the item", path.display()),
            Issue::EmptyAnnotationFile { path } => write!(f, "annotation file {} is empty; label the defects or remove the item", path.display()),
            Issue::UnparseableAnnotation { path, line, text } => write!(f, "line {line} of {} is not `x1 y1 x2 y2 type`: {text:?}; fix that line", path.display()),
            Issue::BadSplitLine { line, text, .. } => write!(f, "line {line} is not `IMAGE.jpg ANNOTATION.txt`: {text:?}; fix or remove that line"),
            Issue::DuplicateId { .. } => write!(f, "is listed more than once; remove the repeat (only the first is used)"),
            Issue::DuplicateAnnotationId { annotation } => write!(f, "has annotation id {annotation} which is used twice in the file; re-export the annotations"),
            Issue::UnknownImage { image_id } => write!(f, "an annotation refers to image id {image_id}, which the file does not list; it was dropped"),
            Issue::BadBbox { annotation, reason } => match annotation {
                Some(id) => write!(f, "annotation {id} has an unusable bbox ({reason}); fix it in the labelling tool"),
                None => write!(f, "an annotation has an unusable bbox ({reason}); fix it in the labelling tool"),
            },
        }
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bad = self.offending_items().len();
        write!(f, "checked {} items: ", self.items)?;
        let other = self.findings.iter().filter(|x| x.item.is_none()).count();
        match (bad, self.policy) {
            (0, _) if other == 0 => write!(f, "all good")?,
            (0, _) => write!(f, "no item has problems")?,
            (_, OnInvalid::Skip) => write!(
                f,
                "{bad} with problems were skipped, {} remain",
                self.items - self.skipped
            )?,
            (_, OnInvalid::Fail) => write!(f, "{bad} have problems")?,
        }
        if other > 0 {
            write!(f, "; {other} more outside any item")?;
        }
        for finding in &self.findings {
            write!(f, "\n  - {}: {}", finding.id, finding.issue)?;
        }
        for note in &self.notes {
            write!(f, "\n  note: {note}")?;
        }
        Ok(())
    }
}
