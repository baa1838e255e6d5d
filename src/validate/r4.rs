//! FHIR R4 (4.0.1) structure: element names, cardinality, choice types, nested datatypes,
//! primitive formats, required code bindings and the core invariants of the types fhirlift
//! produces. It must not know anything about CIBMTR (that is `cibmtr.rs`) and must never name an
//! element's value in a message, only its path and what was expected.
//!
//! # Why hand-written and not a crate
//!
//! The R4 structure crates on the Rust registry were evaluated first. `fhir-sdk` covers STU3, R4B
//! and R5 but not R4. `fhirbolt` 0.4.0 (feature `r4`, its latest release) compiles here, measured
//! in a scratch project with `time cargo build -j2`: 3 min 39 s for a debug build of fhirbolt
//! alone on this 2-core machine (other builds sharing the cores), far over the ~2-minute budget
//! for one stage. It is a (de)serialiser, not a validator (its README lists cardinality
//! validation as future work), and in strict mode it accepted, of fourteen probes, a bad
//! `Observation.status` (`done`), a malformed `effectiveDateTime` (`2024-13-45T99:00`), an unknown
//! comparator (`~`), `gender: "M"`, an id with a space, an empty id and `1990-02-31`. What it does
//! reject (unknown field, missing `status`/`code`/`div`) stops at the first problem with a serde
//! message that names the field but not the FHIR path with array indexes, and a second `value[x]`
//! is reported as "duplicate field `valueString`". So the checks below are hand-written from the
//! R4 specification, table-driven so that adding a datatype is adding a table.
//!
//! # Scope
//!
//! Patient, Observation and Bundle are described in full (every R4 element, with their
//! datatypes down to primitives). Any other resource type gets the basic checks: a known R4
//! resource type name, the formats of `id`, `meta`, `implicitRules`, `language`, `text` and
//! extensions, and the JSON rules (no nulls, no empty strings, objects or arrays). A few rarely
//! used complex datatypes (Signature, Dosage, the metadata types) are checked only by the JSON
//! rules; Timing's invariants are not checked.

use crate::resource::json::{Node as Value, Object as Map};

use super::primitives::{self, Primitive as P};
use super::{Issue, Severity};

/// The message for a missing required element (other modules match on it).
pub(super) const MSG_REQUIRED: &str = "required element is missing";

// ---------------------------------------------------------------------------------------------
// The schema tables.

#[derive(Clone, Copy)]
enum Ty {
    P(P),
    C(&'static Complex),
    /// An inline resource (`contained`, `Bundle.entry.resource`).
    Resource,
    /// A complex type that is not modelled: only the JSON rules apply.
    Opaque,
}

#[derive(Clone, Copy)]
struct Elem {
    name: &'static str,
    ty: Ty,
    min: u8,
    many: bool,
    /// For `value[x]` and friends: the element's name without the type suffix (`value`).
    choice: Option<&'static str>,
    /// A required binding: the only codes allowed.
    codes: Option<&'static [&'static str]>,
}

impl Elem {
    const fn new(name: &'static str, ty: Ty) -> Self {
        Elem {
            name,
            ty,
            min: 0,
            many: false,
            choice: None,
            codes: None,
        }
    }
    const fn req(mut self) -> Self {
        self.min = 1;
        self
    }
    const fn many(mut self) -> Self {
        self.many = true;
        self
    }
    const fn choice(mut self, group: &'static str) -> Self {
        self.choice = Some(group);
        self
    }
    const fn codes(mut self, codes: &'static [&'static str]) -> Self {
        self.codes = Some(codes);
        self
    }
}

const fn e(name: &'static str, ty: Ty) -> Elem {
    Elem::new(name, ty)
}
const fn p(name: &'static str, prim: P) -> Elem {
    Elem::new(name, Ty::P(prim))
}
const fn c(name: &'static str, ty: &'static Complex) -> Elem {
    Elem::new(name, Ty::C(ty))
}

/// Which inherited elements an object has besides its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Base {
    /// Datatypes: `id`, `extension`.
    Element,
    /// Backbone elements: also `modifierExtension`.
    Backbone,
    /// Resource: `id`, `meta`, `implicitRules`, `language`.
    Resource,
    /// DomainResource: also `text`, `contained`, `extension`, `modifierExtension`.
    Domain,
}

type Rule = fn(&Map, &mut Ctx);

struct Complex {
    name: &'static str,
    base: Base,
    elems: &'static [Elem],
    rules: Option<Rule>,
}

const fn dt(name: &'static str, elems: &'static [Elem]) -> Complex {
    Complex {
        name,
        base: Base::Element,
        elems,
        rules: None,
    }
}
const fn bb(name: &'static str, elems: &'static [Elem]) -> Complex {
    Complex {
        name,
        base: Base::Backbone,
        elems,
        rules: None,
    }
}
const fn with_rules(mut c: Complex, rules: Rule) -> Complex {
    c.rules = Some(rules);
    c
}

static ELEMENT_BASE: &[Elem] = &[p("id", P::String), c("extension", &EXTENSION).many()];
static BACKBONE_BASE: &[Elem] = &[
    p("id", P::String),
    c("extension", &EXTENSION).many(),
    c("modifierExtension", &EXTENSION).many(),
];
static RESOURCE_BASE: &[Elem] = &[
    p("id", P::Id),
    c("meta", &META),
    p("implicitRules", P::Uri),
    p("language", P::Code),
];
static DOMAIN_BASE: &[Elem] = &[
    p("id", P::Id),
    c("meta", &META),
    p("implicitRules", P::Uri),
    p("language", P::Code),
    c("text", &NARRATIVE),
    e("contained", Ty::Resource).many(),
    c("extension", &EXTENSION).many(),
    c("modifierExtension", &EXTENSION).many(),
];

impl Base {
    fn elems(self) -> &'static [Elem] {
        match self {
            Base::Element => ELEMENT_BASE,
            Base::Backbone => BACKBONE_BASE,
            Base::Resource => RESOURCE_BASE,
            Base::Domain => DOMAIN_BASE,
        }
    }
}

// Required value sets (R4 4.0.1).
static GENDER: &[&str] = &["male", "female", "other", "unknown"];
static OBS_STATUS: &[&str] = &[
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
];
static COMPARATOR: &[&str] = &["<", "<=", ">=", ">"];
static IDENTIFIER_USE: &[&str] = &["usual", "official", "temp", "secondary", "old"];
static NARRATIVE_STATUS: &[&str] = &["generated", "extensions", "additional", "empty"];
static BUNDLE_TYPE: &[&str] = &[
    "document",
    "message",
    "transaction",
    "transaction-response",
    "batch",
    "batch-response",
    "history",
    "searchset",
    "collection",
];
static HTTP_VERB: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"];
static SEARCH_MODE: &[&str] = &["match", "include", "outcome"];
static NAME_USE: &[&str] = &[
    "usual",
    "official",
    "temp",
    "nickname",
    "anonymous",
    "old",
    "maiden",
];
static CONTACT_SYSTEM: &[&str] = &["phone", "fax", "email", "pager", "url", "sms", "other"];
static CONTACT_USE: &[&str] = &["home", "work", "temp", "old", "mobile"];
static ADDRESS_USE: &[&str] = &["home", "work", "temp", "old", "billing"];
static ADDRESS_TYPE: &[&str] = &["postal", "physical", "both"];
static LINK_TYPE: &[&str] = &["replaced-by", "replaces", "refer", "seealso"];
static UNITS_OF_TIME: &[&str] = &["s", "min", "h", "d", "wk", "mo", "a"];
static DAYS_OF_WEEK: &[&str] = &["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
static EVENT_TIMING: &[&str] = &[
    "MORN",
    "MORN.early",
    "MORN.late",
    "NOON",
    "AFT",
    "AFT.early",
    "AFT.late",
    "EVE",
    "EVE.early",
    "EVE.late",
    "NIGHT",
    "PHS",
    "HS",
    "WAKE",
    "C",
    "CM",
    "CD",
    "CV",
    "AC",
    "ACM",
    "ACD",
    "ACV",
    "PC",
    "PCM",
    "PCD",
    "PCV",
];

// Datatypes.
static ELEMENT: Complex = dt("Element", &[]);
static EXTENSION: Complex = with_rules(dt("Extension", EXTENSION_ELEMS), rule_ext_1);
static NARRATIVE: Complex = dt(
    "Narrative",
    &[
        p("status", P::Code).req().codes(NARRATIVE_STATUS),
        p("div", P::Xhtml).req(),
    ],
);
static META: Complex = dt(
    "Meta",
    &[
        p("versionId", P::Id),
        p("lastUpdated", P::Instant),
        p("source", P::Uri),
        p("profile", P::Canonical).many(),
        c("security", &CODING).many(),
        c("tag", &CODING).many(),
    ],
);
static CODING: Complex = dt(
    "Coding",
    &[
        p("system", P::Uri),
        p("version", P::String),
        p("code", P::Code),
        p("display", P::String),
        p("userSelected", P::Boolean),
    ],
);
static CODEABLE_CONCEPT: Complex = dt(
    "CodeableConcept",
    &[c("coding", &CODING).many(), p("text", P::String)],
);
static IDENTIFIER: Complex = dt(
    "Identifier",
    &[
        p("use", P::Code).codes(IDENTIFIER_USE),
        c("type", &CODEABLE_CONCEPT),
        p("system", P::Uri),
        p("value", P::String),
        c("period", &PERIOD),
        c("assigner", &REFERENCE),
    ],
);
static REFERENCE: Complex = dt(
    "Reference",
    &[
        p("reference", P::String),
        p("type", P::Uri),
        c("identifier", &IDENTIFIER),
        p("display", P::String),
    ],
);
static PERIOD: Complex = with_rules(
    dt("Period", &[p("start", P::DateTime), p("end", P::DateTime)]),
    rule_per_1,
);
static QUANTITY_ELEMS: &[Elem] = &[
    p("value", P::Decimal),
    p("comparator", P::Code).codes(COMPARATOR),
    p("unit", P::String),
    p("system", P::Uri),
    p("code", P::Code),
];
static QUANTITY: Complex = with_rules(dt("Quantity", QUANTITY_ELEMS), rule_qty_3);
// SimpleQuantity is Quantity without `comparator` (sqty-1).
static SIMPLE_QUANTITY: Complex = with_rules(
    dt(
        "SimpleQuantity",
        &[
            p("value", P::Decimal),
            p("unit", P::String),
            p("system", P::Uri),
            p("code", P::Code),
        ],
    ),
    rule_qty_3,
);
static AGE: Complex = with_rules(dt("Age", QUANTITY_ELEMS), rule_qty_3);
static COUNT: Complex = with_rules(dt("Count", QUANTITY_ELEMS), rule_qty_3);
static DISTANCE: Complex = with_rules(dt("Distance", QUANTITY_ELEMS), rule_qty_3);
static DURATION: Complex = with_rules(dt("Duration", QUANTITY_ELEMS), rule_qty_3);
static MONEY: Complex = dt("Money", &[p("value", P::Decimal), p("currency", P::Code)]);
static RANGE: Complex = with_rules(
    dt(
        "Range",
        &[c("low", &SIMPLE_QUANTITY), c("high", &SIMPLE_QUANTITY)],
    ),
    rule_rng_2,
);
static RATIO: Complex = dt(
    "Ratio",
    &[c("numerator", &QUANTITY), c("denominator", &QUANTITY)],
);
static SAMPLED_DATA: Complex = dt(
    "SampledData",
    &[
        c("origin", &SIMPLE_QUANTITY).req(),
        p("period", P::Decimal).req(),
        p("factor", P::Decimal),
        p("lowerLimit", P::Decimal),
        p("upperLimit", P::Decimal),
        p("dimensions", P::PositiveInt).req(),
        p("data", P::String),
    ],
);
static HUMAN_NAME: Complex = dt(
    "HumanName",
    &[
        p("use", P::Code).codes(NAME_USE),
        p("text", P::String),
        p("family", P::String),
        p("given", P::String).many(),
        p("prefix", P::String).many(),
        p("suffix", P::String).many(),
        c("period", &PERIOD),
    ],
);
static CONTACT_POINT: Complex = with_rules(
    dt(
        "ContactPoint",
        &[
            p("system", P::Code).codes(CONTACT_SYSTEM),
            p("value", P::String),
            p("use", P::Code).codes(CONTACT_USE),
            p("rank", P::PositiveInt),
            c("period", &PERIOD),
        ],
    ),
    rule_cpt_2,
);
static ADDRESS: Complex = dt(
    "Address",
    &[
        p("use", P::Code).codes(ADDRESS_USE),
        p("type", P::Code).codes(ADDRESS_TYPE),
        p("text", P::String),
        p("line", P::String).many(),
        p("city", P::String),
        p("district", P::String),
        p("state", P::String),
        p("postalCode", P::String),
        p("country", P::String),
        c("period", &PERIOD),
    ],
);
static ATTACHMENT: Complex = with_rules(
    dt(
        "Attachment",
        &[
            p("contentType", P::Code),
            p("language", P::Code),
            p("data", P::Base64Binary),
            p("url", P::Url),
            p("size", P::UnsignedInt),
            p("hash", P::Base64Binary),
            p("title", P::String),
            p("creation", P::DateTime),
        ],
    ),
    rule_att_1,
);
static ANNOTATION: Complex = dt(
    "Annotation",
    &[
        c("authorReference", &REFERENCE).choice("author"),
        p("authorString", P::String).choice("author"),
        p("time", P::DateTime),
        p("text", P::Markdown).req(),
    ],
);
static TIMING_REPEAT: Complex = dt(
    "Timing.repeat",
    &[
        c("boundsDuration", &DURATION).choice("bounds"),
        c("boundsRange", &RANGE).choice("bounds"),
        c("boundsPeriod", &PERIOD).choice("bounds"),
        p("count", P::PositiveInt),
        p("countMax", P::PositiveInt),
        p("duration", P::Decimal),
        p("durationMax", P::Decimal),
        p("durationUnit", P::Code).codes(UNITS_OF_TIME),
        p("frequency", P::PositiveInt),
        p("frequencyMax", P::PositiveInt),
        p("period", P::Decimal),
        p("periodMax", P::Decimal),
        p("periodUnit", P::Code).codes(UNITS_OF_TIME),
        p("dayOfWeek", P::Code).many().codes(DAYS_OF_WEEK),
        p("timeOfDay", P::Time).many(),
        p("when", P::Code).many().codes(EVENT_TIMING),
        p("offset", P::UnsignedInt),
    ],
);
static TIMING: Complex = Complex {
    name: "Timing",
    base: Base::Backbone,
    elems: &[
        p("event", P::DateTime).many(),
        c("repeat", &TIMING_REPEAT),
        c("code", &CODEABLE_CONCEPT),
    ],
    rules: None,
};

static EXTENSION_ELEMS: &[Elem] = &[
    p("url", P::Uri).req(),
    p("valueBase64Binary", P::Base64Binary).choice("value"),
    p("valueBoolean", P::Boolean).choice("value"),
    p("valueCanonical", P::Canonical).choice("value"),
    p("valueCode", P::Code).choice("value"),
    p("valueDate", P::Date).choice("value"),
    p("valueDateTime", P::DateTime).choice("value"),
    p("valueDecimal", P::Decimal).choice("value"),
    p("valueId", P::Id).choice("value"),
    p("valueInstant", P::Instant).choice("value"),
    p("valueInteger", P::Integer).choice("value"),
    p("valueMarkdown", P::Markdown).choice("value"),
    p("valueOid", P::Oid).choice("value"),
    p("valuePositiveInt", P::PositiveInt).choice("value"),
    p("valueString", P::String).choice("value"),
    p("valueTime", P::Time).choice("value"),
    p("valueUnsignedInt", P::UnsignedInt).choice("value"),
    p("valueUri", P::Uri).choice("value"),
    p("valueUrl", P::Url).choice("value"),
    p("valueUuid", P::Uuid).choice("value"),
    c("valueAddress", &ADDRESS).choice("value"),
    c("valueAge", &AGE).choice("value"),
    c("valueAnnotation", &ANNOTATION).choice("value"),
    c("valueAttachment", &ATTACHMENT).choice("value"),
    c("valueCodeableConcept", &CODEABLE_CONCEPT).choice("value"),
    c("valueCoding", &CODING).choice("value"),
    c("valueContactPoint", &CONTACT_POINT).choice("value"),
    c("valueCount", &COUNT).choice("value"),
    c("valueDistance", &DISTANCE).choice("value"),
    c("valueDuration", &DURATION).choice("value"),
    c("valueHumanName", &HUMAN_NAME).choice("value"),
    c("valueIdentifier", &IDENTIFIER).choice("value"),
    c("valueMoney", &MONEY).choice("value"),
    c("valuePeriod", &PERIOD).choice("value"),
    c("valueQuantity", &QUANTITY).choice("value"),
    c("valueRange", &RANGE).choice("value"),
    c("valueRatio", &RATIO).choice("value"),
    c("valueReference", &REFERENCE).choice("value"),
    c("valueSampledData", &SAMPLED_DATA).choice("value"),
    e("valueSignature", Ty::Opaque).choice("value"),
    c("valueTiming", &TIMING).choice("value"),
    e("valueContactDetail", Ty::Opaque).choice("value"),
    e("valueContributor", Ty::Opaque).choice("value"),
    e("valueDataRequirement", Ty::Opaque).choice("value"),
    e("valueExpression", Ty::Opaque).choice("value"),
    e("valueParameterDefinition", Ty::Opaque).choice("value"),
    e("valueRelatedArtifact", Ty::Opaque).choice("value"),
    e("valueTriggerDefinition", Ty::Opaque).choice("value"),
    e("valueUsageContext", Ty::Opaque).choice("value"),
    e("valueDosage", Ty::Opaque).choice("value"),
    c("valueMeta", &META).choice("value"),
];

// Patient.
static PATIENT_CONTACT: Complex = with_rules(
    bb(
        "Patient.contact",
        &[
            c("relationship", &CODEABLE_CONCEPT).many(),
            c("name", &HUMAN_NAME),
            c("telecom", &CONTACT_POINT).many(),
            c("address", &ADDRESS),
            p("gender", P::Code).codes(GENDER),
            c("organization", &REFERENCE),
            c("period", &PERIOD),
        ],
    ),
    rule_pat_1,
);
static PATIENT_COMMUNICATION: Complex = bb(
    "Patient.communication",
    &[
        c("language", &CODEABLE_CONCEPT).req(),
        p("preferred", P::Boolean),
    ],
);
static PATIENT_LINK: Complex = bb(
    "Patient.link",
    &[
        c("other", &REFERENCE).req(),
        p("type", P::Code).req().codes(LINK_TYPE),
    ],
);
static PATIENT: Complex = Complex {
    name: "Patient",
    base: Base::Domain,
    elems: &[
        c("identifier", &IDENTIFIER).many(),
        p("active", P::Boolean),
        c("name", &HUMAN_NAME).many(),
        c("telecom", &CONTACT_POINT).many(),
        p("gender", P::Code).codes(GENDER),
        p("birthDate", P::Date),
        p("deceasedBoolean", P::Boolean).choice("deceased"),
        p("deceasedDateTime", P::DateTime).choice("deceased"),
        c("address", &ADDRESS).many(),
        c("maritalStatus", &CODEABLE_CONCEPT),
        p("multipleBirthBoolean", P::Boolean).choice("multipleBirth"),
        p("multipleBirthInteger", P::Integer).choice("multipleBirth"),
        c("photo", &ATTACHMENT).many(),
        c("contact", &PATIENT_CONTACT).many(),
        c("communication", &PATIENT_COMMUNICATION).many(),
        c("generalPractitioner", &REFERENCE).many(),
        c("managingOrganization", &REFERENCE),
        c("link", &PATIENT_LINK).many(),
    ],
    rules: None,
};

// Observation.
static OBS_REFERENCE_RANGE: Complex = with_rules(
    bb(
        "Observation.referenceRange",
        &[
            c("low", &SIMPLE_QUANTITY),
            c("high", &SIMPLE_QUANTITY),
            c("type", &CODEABLE_CONCEPT),
            c("appliesTo", &CODEABLE_CONCEPT).many(),
            c("age", &RANGE),
            p("text", P::String),
        ],
    ),
    rule_obs_3,
);
static OBS_COMPONENT: Complex = bb(
    "Observation.component",
    &[
        c("code", &CODEABLE_CONCEPT).req(),
        c("valueQuantity", &QUANTITY).choice("value"),
        c("valueCodeableConcept", &CODEABLE_CONCEPT).choice("value"),
        p("valueString", P::String).choice("value"),
        p("valueBoolean", P::Boolean).choice("value"),
        p("valueInteger", P::Integer).choice("value"),
        c("valueRange", &RANGE).choice("value"),
        c("valueRatio", &RATIO).choice("value"),
        c("valueSampledData", &SAMPLED_DATA).choice("value"),
        p("valueTime", P::Time).choice("value"),
        p("valueDateTime", P::DateTime).choice("value"),
        c("valuePeriod", &PERIOD).choice("value"),
        c("dataAbsentReason", &CODEABLE_CONCEPT),
        c("interpretation", &CODEABLE_CONCEPT).many(),
        c("referenceRange", &OBS_REFERENCE_RANGE).many(),
    ],
);
static OBSERVATION: Complex = Complex {
    name: "Observation",
    base: Base::Domain,
    elems: &[
        c("identifier", &IDENTIFIER).many(),
        c("basedOn", &REFERENCE).many(),
        c("partOf", &REFERENCE).many(),
        p("status", P::Code).req().codes(OBS_STATUS),
        c("category", &CODEABLE_CONCEPT).many(),
        c("code", &CODEABLE_CONCEPT).req(),
        c("subject", &REFERENCE),
        c("focus", &REFERENCE).many(),
        c("encounter", &REFERENCE),
        p("effectiveDateTime", P::DateTime).choice("effective"),
        c("effectivePeriod", &PERIOD).choice("effective"),
        c("effectiveTiming", &TIMING).choice("effective"),
        p("effectiveInstant", P::Instant).choice("effective"),
        p("issued", P::Instant),
        c("performer", &REFERENCE).many(),
        c("valueQuantity", &QUANTITY).choice("value"),
        c("valueCodeableConcept", &CODEABLE_CONCEPT).choice("value"),
        p("valueString", P::String).choice("value"),
        p("valueBoolean", P::Boolean).choice("value"),
        p("valueInteger", P::Integer).choice("value"),
        c("valueRange", &RANGE).choice("value"),
        c("valueRatio", &RATIO).choice("value"),
        c("valueSampledData", &SAMPLED_DATA).choice("value"),
        p("valueTime", P::Time).choice("value"),
        p("valueDateTime", P::DateTime).choice("value"),
        c("valuePeriod", &PERIOD).choice("value"),
        c("dataAbsentReason", &CODEABLE_CONCEPT),
        c("interpretation", &CODEABLE_CONCEPT).many(),
        c("note", &ANNOTATION).many(),
        c("bodySite", &CODEABLE_CONCEPT),
        c("method", &CODEABLE_CONCEPT),
        c("specimen", &REFERENCE),
        c("device", &REFERENCE),
        c("referenceRange", &OBS_REFERENCE_RANGE).many(),
        c("hasMember", &REFERENCE).many(),
        c("derivedFrom", &REFERENCE).many(),
        c("component", &OBS_COMPONENT).many(),
    ],
    rules: Some(rule_obs_6_7),
};

// Bundle.
static BUNDLE_LINK: Complex = bb(
    "Bundle.link",
    &[p("relation", P::String).req(), p("url", P::Uri).req()],
);
static BUNDLE_SEARCH: Complex = bb(
    "Bundle.entry.search",
    &[
        p("mode", P::Code).codes(SEARCH_MODE),
        p("score", P::Decimal),
    ],
);
static BUNDLE_REQUEST: Complex = bb(
    "Bundle.entry.request",
    &[
        p("method", P::Code).req().codes(HTTP_VERB),
        p("url", P::Uri).req(),
        p("ifNoneMatch", P::String),
        p("ifModifiedSince", P::Instant),
        p("ifMatch", P::String),
        p("ifNoneExist", P::String),
    ],
);
static BUNDLE_RESPONSE: Complex = bb(
    "Bundle.entry.response",
    &[
        p("status", P::String).req(),
        p("location", P::Uri),
        p("etag", P::String),
        p("lastModified", P::Instant),
        e("outcome", Ty::Resource),
    ],
);
static BUNDLE_ENTRY: Complex = bb(
    "Bundle.entry",
    &[
        c("link", &BUNDLE_LINK).many(),
        p("fullUrl", P::Uri),
        e("resource", Ty::Resource),
        c("search", &BUNDLE_SEARCH),
        c("request", &BUNDLE_REQUEST),
        c("response", &BUNDLE_RESPONSE),
    ],
);
static BUNDLE: Complex = Complex {
    name: "Bundle",
    base: Base::Resource,
    elems: &[
        c("identifier", &IDENTIFIER),
        p("type", P::Code).req().codes(BUNDLE_TYPE),
        p("timestamp", P::Instant),
        p("total", P::UnsignedInt),
        c("link", &BUNDLE_LINK).many(),
        c("entry", &BUNDLE_ENTRY).many(),
        e("signature", Ty::Opaque),
    ],
    rules: Some(rule_bundle),
};

/// Every R4 (4.0.1) resource type name, sorted for binary search.
pub(super) static RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// Whether `name` is an R4 resource type.
pub(super) fn is_resource_type(name: &str) -> bool {
    RESOURCE_TYPES.binary_search(&name).is_ok()
}

// ---------------------------------------------------------------------------------------------
// The walker.

/// The path being checked and the issues found so far. The path is one buffer, extended and
/// truncated as the walk goes, so that a valid resource costs no allocation per element.
pub(super) struct Ctx {
    pub(super) path: String,
    pub(super) issues: Vec<Issue>,
}

impl Ctx {
    pub(super) fn new(root: &str) -> Self {
        let mut path = String::with_capacity(64);
        path.push_str(root);
        Ctx {
            path,
            issues: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, severity: Severity, message: impl Into<String>) {
        self.issues.push(Issue {
            severity,
            path: self.path.clone(),
            message: message.into(),
        });
    }

    pub(super) fn error(&mut self, message: impl Into<String>) {
        self.push(Severity::Error, message);
    }

    /// An issue on a child element, without entering it.
    pub(super) fn at(&mut self, child: &str, severity: Severity, message: impl Into<String>) {
        let mark = self.enter(child);
        self.push(severity, message);
        self.leave(mark);
    }

    pub(super) fn error_at(&mut self, child: &str, message: impl Into<String>) {
        self.at(child, Severity::Error, message);
    }

    pub(super) fn enter(&mut self, name: &str) -> usize {
        let mark = self.path.len();
        self.path.push('.');
        self.path.push_str(name);
        mark
    }

    pub(super) fn enter_index(&mut self, i: usize) -> usize {
        let mark = self.path.len();
        self.path.push('[');
        // Digits by hand: this runs for every array item, and the formatting machinery costs
        // more than the rest of the step.
        let mut digits = [0u8; 20];
        let mut n = i;
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[at..] {
            self.path.push(char::from(d));
        }
        self.path.push(']');
        mark
    }

    pub(super) fn leave(&mut self, mark: usize) {
        self.path.truncate(mark);
    }
}

/// Validates one resource (the API's `validate_r4`).
pub(super) fn validate(resource: &Value) -> Vec<Issue> {
    let root = root_name(resource);
    let mut ctx = Ctx::new(root);
    check_resource(&mut ctx, resource, Nesting::Top);
    ctx.issues
}

/// The path root for a resource: its type if it is a known R4 type, else `Resource`.
pub(super) fn root_name<'a>(resource: &'a Value<'_>) -> &'a str {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some(t) if is_resource_type(t) => t,
        _ => "Resource",
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nesting {
    Top,
    Contained,
    /// Inside a Bundle entry (or an entry's response outcome).
    Entry,
}

fn check_resource(ctx: &mut Ctx, v: &Value, nesting: Nesting) {
    let Value::Object(obj) = v else {
        ctx.error("a resource must be a JSON object");
        return;
    };
    let rt = match obj.get("resourceType") {
        Some(Value::String(t)) => &**t,
        Some(_) => {
            ctx.error_at(
                "resourceType",
                "must be a string naming an R4 resource type",
            );
            return;
        }
        None => {
            ctx.error_at("resourceType", MSG_REQUIRED);
            return;
        }
    };
    if !is_resource_type(rt) {
        ctx.error_at("resourceType", "not an R4 resource type");
        return;
    }
    match rt {
        "Patient" => check_object(ctx, obj, &PATIENT),
        "Observation" => check_object(ctx, obj, &OBSERVATION),
        "Bundle" => check_object(ctx, obj, &BUNDLE),
        _ => check_other_resource(ctx, obj, rt),
    }
    if nesting == Nesting::Contained {
        // dom-2: contained resources cannot contain resources; dom-4: no versionId/lastUpdated.
        if obj.contains_key("contained") {
            ctx.error_at(
                "contained",
                "a contained resource must not contain other resources (dom-2)",
            );
        }
        if let Some(meta) = obj.get("meta").and_then(Value::as_object) {
            for k in ["versionId", "lastUpdated"] {
                if meta.contains_key(k) {
                    let mark = ctx.enter("meta");
                    ctx.error_at(k, "not allowed in a contained resource (dom-4)");
                    ctx.leave(mark);
                }
            }
        }
    }
}

/// Resource types not described in full: the inherited elements are checked, the rest only by
/// the JSON rules.
fn check_other_resource(ctx: &mut Ctx, obj: &Map, rt: &str) {
    let base = match rt {
        "Binary" | "Parameters" => Base::Resource,
        _ => Base::Domain,
    };
    for (k, v) in obj {
        if k == "resourceType" {
            continue;
        }
        match base.elems().iter().find(|el| el.name == k) {
            Some(el) => check_elem(ctx, k, v, el, obj),
            None => {
                let mark = ctx.enter(k);
                check_json(ctx, v);
                ctx.leave(mark);
            }
        }
    }
}

fn find_elem<'a>(c: &'a Complex, name: &str) -> Option<&'a Elem> {
    // Length and first byte first: most candidates differ there, which spares a memcmp call.
    let first = name.as_bytes().first();
    c.elems.iter().chain(c.base.elems()).find(|el| {
        el.name.len() == name.len() && el.name.as_bytes().first() == first && el.name == name
    })
}

fn check_complex(ctx: &mut Ctx, v: &Value, c: &Complex) {
    match v {
        Value::Object(obj) => check_object(ctx, obj, c),
        _ => ctx.error(format!("must be a JSON object ({})", c.name)),
    }
}

fn check_object(ctx: &mut Ctx, obj: &Map, c: &Complex) {
    let is_resource = matches!(c.base, Base::Resource | Base::Domain);
    // ele-1 (an element has a value or children); a resource with only its type is valid R4.
    if obj.is_empty() {
        ctx.error("must not be an empty object");
        return;
    }
    // The choice groups seen so far, with the element that used them (few per type).
    let mut seen: [(&str, &str); 4] = [("", ""); 4];
    let mut n_seen = 0;
    for (k, v) in obj {
        if is_resource && k == "resourceType" {
            continue;
        }
        if let Some(name) = k.strip_prefix('_') {
            match find_elem(c, name) {
                Some(el) if matches!(el.ty, Ty::P(_)) => check_primitive_extension(ctx, k, v, el),
                _ => ctx.error_at(k, format!("unknown element (not in R4 {})", c.name)),
            }
            continue;
        }
        let Some(el) = find_elem(c, k) else {
            ctx.error_at(k, format!("unknown element (not in R4 {})", c.name));
            continue;
        };
        if let Some(group) = el.choice {
            if let Some((_, other)) = seen[..n_seen].iter().find(|(g, _)| *g == group) {
                ctx.error_at(
                    k,
                    format!("only one {group}[x] is allowed, and {other} is also present"),
                );
            } else if n_seen < seen.len() {
                seen[n_seen] = (group, k);
                n_seen += 1;
            }
        }
        check_elem(ctx, k, v, el, obj);
    }
    for el in c.elems.iter().filter(|el| el.min > 0) {
        let present = match el.choice {
            Some(group) => seen[..n_seen].iter().any(|(g, _)| *g == group),
            None => {
                obj.contains_key(el.name)
                    || (matches!(el.ty, Ty::P(_)) && obj.contains_key(&format!("_{}", el.name)))
            }
        };
        if !present {
            match el.choice {
                Some(group) => ctx.error_at(&format!("{group}[x]"), MSG_REQUIRED),
                None => ctx.error_at(el.name, MSG_REQUIRED),
            }
        }
    }
    if let Some(rules) = c.rules {
        rules(obj, ctx);
    }
}

fn check_elem(ctx: &mut Ctx, key: &str, v: &Value, el: &Elem, parent: &Map) {
    let mark = ctx.enter(key);
    if el.many {
        match v {
            Value::Array(items) if items.is_empty() => ctx.error("must not be an empty array"),
            Value::Array(items) => {
                // A null in a primitive array is allowed only where `_name` carries the
                // extension for that position.
                let ext = match el.ty {
                    Ty::P(_) => parent.get(&format!("_{key}")).and_then(Value::as_array),
                    _ => None,
                };
                for (i, item) in items.iter().enumerate() {
                    let m = ctx.enter_index(i);
                    if item.is_null() {
                        let covered = ext.and_then(|x| x.get(i)).is_some_and(|x| !x.is_null());
                        if !covered {
                            ctx.error("null is not allowed");
                        }
                    } else {
                        check_value(ctx, item, el);
                    }
                    ctx.leave(m);
                }
            }
            _ => ctx.error("must be a JSON array (this element repeats)"),
        }
    } else {
        match v {
            Value::Array(_) => ctx.error("must be a single value, not an array (0..1)"),
            Value::Null => ctx.error("null is not allowed"),
            _ => check_value(ctx, v, el),
        }
    }
    ctx.leave(mark);
}

fn check_value(ctx: &mut Ctx, v: &Value, el: &Elem) {
    match el.ty {
        Ty::P(prim) => match prim.check(v) {
            Err(msg) => ctx.error(msg),
            Ok(()) => {
                if let (Some(codes), Some(s)) = (el.codes, v.as_str())
                    && !codes.contains(&s)
                {
                    ctx.error(format!(
                        "code is not in the required value set ({})",
                        codes.join(" | ")
                    ));
                }
            }
        },
        Ty::C(c) => check_complex(ctx, v, c),
        Ty::Resource => check_resource(
            ctx,
            v,
            if el.name == "contained" {
                Nesting::Contained
            } else {
                Nesting::Entry
            },
        ),
        Ty::Opaque => check_json(ctx, v),
    }
}

/// `_name`: the id and extensions of a primitive element (an array of them, null where a
/// position has none, when the element repeats).
fn check_primitive_extension(ctx: &mut Ctx, key: &str, v: &Value, el: &Elem) {
    let mark = ctx.enter(key);
    match (el.many, v) {
        (true, Value::Array(items)) if !items.is_empty() && items.iter().any(|x| !x.is_null()) => {
            for (i, item) in items.iter().enumerate() {
                if !item.is_null() {
                    let m = ctx.enter_index(i);
                    check_complex(ctx, item, &ELEMENT);
                    ctx.leave(m);
                }
            }
        }
        (true, _) => ctx.error("must be a JSON array with an entry per value"),
        (false, Value::Object(_)) => check_complex(ctx, v, &ELEMENT),
        (false, _) => ctx.error("must be a JSON object (the element's id and extensions)"),
    }
    ctx.leave(mark);
}

/// The JSON rules for parts that are not modelled: no nulls, no empty strings, objects or arrays.
fn check_json(ctx: &mut Ctx, v: &Value) {
    match v {
        Value::Null => ctx.error("null is not allowed"),
        Value::String(s) if s.is_empty() => ctx.error("must not be an empty string"),
        Value::Array(a) if a.is_empty() => ctx.error("must not be an empty array"),
        Value::Object(o) if o.is_empty() => ctx.error("must not be an empty object"),
        Value::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                let m = ctx.enter_index(i);
                check_json(ctx, item);
                ctx.leave(m);
            }
        }
        Value::Object(o) => {
            for (k, item) in o {
                // Inside `_name` arrays a null is legitimate.
                if item.is_null() && k.starts_with('_') {
                    continue;
                }
                let m = ctx.enter(k);
                check_json(ctx, item);
                ctx.leave(m);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Invariants.

/// ext-1: an extension has either nested extensions or a value, not both and not neither.
fn rule_ext_1(obj: &Map, ctx: &mut Ctx) {
    let has_value = obj.keys().any(|k| k.starts_with("value"));
    let has_ext = obj.contains_key("extension");
    if has_value && has_ext {
        ctx.error("an extension has a value[x] or nested extensions, not both (ext-1)");
    } else if !has_value && !has_ext {
        ctx.error("an extension needs a value[x] or nested extensions (ext-1)");
    }
}

/// per-1: start must not be after end (compared when both carry a full date).
fn rule_per_1(obj: &Map, ctx: &mut Ctx) {
    let (Some(start), Some(end)) = (
        obj.get("start").and_then(Value::as_str),
        obj.get("end").and_then(Value::as_str),
    ) else {
        return;
    };
    let after = match (
        chrono::DateTime::parse_from_rfc3339(start),
        chrono::DateTime::parse_from_rfc3339(end),
    ) {
        (Ok(s), Ok(e)) => s > e,
        // Dates of the same precision compare as strings.
        _ if start.len() == end.len() && !start.contains('T') => start > end,
        _ => false,
    };
    if after {
        ctx.error_at("start", "the period starts after it ends (per-1)");
    }
}

/// qty-3: a code needs a system.
fn rule_qty_3(obj: &Map, ctx: &mut Ctx) {
    if obj.contains_key("code") && !obj.contains_key("system") {
        ctx.error_at(
            "system",
            "a quantity with a code must name its system (qty-3)",
        );
    }
}

/// rng-2: low must not be above high.
fn rule_rng_2(obj: &Map, ctx: &mut Ctx) {
    let value = |k: &str| {
        obj.get(k)
            .and_then(|q| q.get("value"))
            .and_then(Value::as_f64)
    };
    if let (Some(low), Some(high)) = (value("low"), value("high"))
        && low > high
    {
        ctx.error_at("low", "the range's low is above its high (rng-2)");
    }
}

/// cpt-2: a contact point with a system has a value.
fn rule_cpt_2(obj: &Map, ctx: &mut Ctx) {
    if obj.contains_key("system") && !obj.contains_key("value") {
        ctx.error_at(
            "value",
            "a contact point with a system needs a value (cpt-2)",
        );
    }
}

/// att-1: inline data needs a content type.
fn rule_att_1(obj: &Map, ctx: &mut Ctx) {
    if obj.contains_key("data") && !obj.contains_key("contentType") {
        ctx.error_at(
            "contentType",
            "an attachment with data needs a contentType (att-1)",
        );
    }
}

/// pat-1: a contact has details or an organization.
fn rule_pat_1(obj: &Map, ctx: &mut Ctx) {
    if !["name", "telecom", "address", "organization"]
        .iter()
        .any(|k| obj.contains_key(k))
    {
        ctx.error("a contact needs a name, telecom, address or organization (pat-1)");
    }
}

/// obs-3: a reference range has at least a low, a high or a text.
fn rule_obs_3(obj: &Map, ctx: &mut Ctx) {
    if !["low", "high", "text"].iter().any(|k| obj.contains_key(k)) {
        ctx.error("a reference range needs a low, a high or a text (obs-3)");
    }
}

fn has_value(obj: &Map) -> bool {
    obj.keys()
        .any(|k| k.starts_with("value") && k.len() > "value".len())
}

/// obs-6: dataAbsentReason only without a value; obs-7: a component with the observation's own
/// code means the observation itself carries no value.
fn rule_obs_6_7(obj: &Map, ctx: &mut Ctx) {
    let value = has_value(obj);
    if value && obj.contains_key("dataAbsentReason") {
        ctx.error_at(
            "dataAbsentReason",
            "dataAbsentReason is only allowed when there is no value[x] (obs-6)",
        );
    }
    if !value {
        return;
    }
    let codings = |cc: Option<&Value>| -> Vec<(String, String)> {
        cc.and_then(|c| c.get("coding"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| {
                        Some((
                            c.get("system")?.as_str()?.to_owned(),
                            c.get("code")?.as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let Some(components) = obj.get("component").and_then(Value::as_array) else {
        return;
    };
    let own = codings(obj.get("code"));
    for (i, comp) in components.iter().enumerate() {
        if codings(comp.get("code")).iter().any(|c| own.contains(c)) {
            let m = ctx.enter("component");
            let m2 = ctx.enter_index(i);
            ctx.error_at(
                "code",
                "a component repeats the observation's code while the observation has a value (obs-7)",
            );
            ctx.leave(m2);
            ctx.leave(m);
        }
    }
}

/// The Bundle invariants bdl-1, 2, 3, 4, 5, 7 and 8 (the document and message ones do not apply
/// to what fhirlift sends).
fn rule_bundle(obj: &Map, ctx: &mut Ctx) {
    let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
    if obj.contains_key("total") && !matches!(ty, "searchset" | "history") {
        ctx.error_at(
            "total",
            "total is only allowed in a searchset or history bundle (bdl-1)",
        );
    }
    let Some(entries) = obj.get("entry").and_then(Value::as_array) else {
        return;
    };
    let needs_request = matches!(ty, "batch" | "transaction" | "history");
    let needs_response = matches!(ty, "batch-response" | "transaction-response" | "history");
    let mut full_urls: Vec<(&str, Option<&str>)> = Vec::with_capacity(entries.len());
    let mark = ctx.enter("entry");
    for (i, entry) in entries.iter().enumerate() {
        let Some(entry) = entry.as_object() else {
            continue;
        };
        let m = ctx.enter_index(i);
        if entry.contains_key("search") && ty != "searchset" {
            ctx.error_at(
                "search",
                "entry.search is only allowed in a searchset bundle (bdl-2)",
            );
        }
        if needs_request && !entry.contains_key("request") {
            ctx.error_at(
                "request",
                format!("{MSG_REQUIRED} in a {ty} bundle (bdl-3)"),
            );
        }
        if needs_response && !entry.contains_key("response") {
            ctx.error_at(
                "response",
                format!("{MSG_REQUIRED} in a {ty} bundle (bdl-4)"),
            );
        }
        if !["resource", "request", "response"]
            .iter()
            .any(|k| entry.contains_key(k))
        {
            ctx.error("an entry needs a resource, a request or a response (bdl-5)");
        }
        if let Some(full_url) = entry.get("fullUrl").and_then(Value::as_str) {
            if full_url.contains("/_history/") {
                ctx.error_at(
                    "fullUrl",
                    "fullUrl must not be a version-specific reference (bdl-8)",
                );
            }
            if full_url.starts_with("urn:uuid:") && !primitives::is_uuid(full_url) {
                ctx.error_at(
                    "fullUrl",
                    "not a valid urn:uuid (lower-case hex 8-4-4-4-12)",
                );
            }
            let version = entry
                .get("resource")
                .and_then(|r| r.get("meta"))
                .and_then(|m| m.get("versionId"))
                .and_then(Value::as_str);
            if full_urls.contains(&(full_url, version)) {
                ctx.error_at(
                    "fullUrl",
                    "another entry has the same fullUrl (and version) (bdl-7)",
                );
            } else {
                full_urls.push((full_url, version));
            }
        }
        ctx.leave(m);
    }
    ctx.leave(mark);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::{Map, Value};

    fn validate(v: &Value) -> Vec<Issue> {
        super::validate(&crate::resource::json::Node::from_value(v))
    }

    fn paths(v: &Value) -> Vec<String> {
        validate(v).into_iter().map(|i| i.path).collect()
    }

    fn one(v: &Value) -> Issue {
        let issues = validate(v);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        issues.into_iter().next().unwrap()
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "meta": {"security": [{"system": "http://cibmtr.org/codesystem/transplant-center", "code": "rc_12001"}]},
            "text": {"status": "empty", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Patient</div>"},
            "identifier": [{"use": "official", "system": "http://cibmtr.org/identifier/CRID", "value": "3989144"}],
            "gender": "female",
            "birthDate": "1970-01-01",
            "extension": [{
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                "extension": [
                    {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}},
                    {"url": "text", "valueString": "White"}
                ]
            }]
        })
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin [Mass/volume] in Blood"}]},
            "subject": {"reference": "Patient/123"},
            "effectiveDateTime": "2024-03-01T08:30:00-05:00",
            "valueQuantity": {"value": 13.2, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
            "referenceRange": [{"low": {"value": 12, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"}, "text": "12-16"}]
        })
    }

    fn with(mut v: Value, f: impl FnOnce(&mut Map<String, Value>)) -> Value {
        f(v.as_object_mut().unwrap());
        v
    }

    #[test]
    fn array_indexes_in_paths() {
        let mut ctx = Ctx::new("Bundle");
        for i in [0, 7, 10, 49, 1234] {
            let m = ctx.enter_index(i);
            assert_eq!(ctx.path, format!("Bundle[{i}]"));
            ctx.leave(m);
        }
    }

    #[test]
    fn resource_types_are_sorted_and_complete() {
        assert!(RESOURCE_TYPES.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(RESOURCE_TYPES.len(), 146);
        assert!(is_resource_type("Observation"));
        assert!(!is_resource_type("observation"));
    }

    #[test]
    fn valid_resources_pass() {
        assert_eq!(validate(&patient()), vec![]);
        assert_eq!(validate(&observation()), vec![]);
        assert_eq!(
            validate(&json!({"resourceType": "Patient", "id": "p1"})),
            vec![]
        );
    }

    #[test]
    fn ig_minimal_patient_lacks_the_div() {
        let ig = json!({
            "resourceType": "Patient",
            "meta": {"security": [{"system": "http://cibmtr.org/codesystem/transplant-center", "code": "rc_12001"}]},
            "text": {"status": "empty"},
            "identifier": [{"use": "official", "system": "http://cibmtr.org/identifier/CRID", "value": "3989144"}]
        });
        let issue = one(&ig);
        assert_eq!(issue.path, "Patient.text.div");
        assert_eq!(issue.message, MSG_REQUIRED);
    }

    #[test]
    fn observation_required_elements() {
        let v = with(observation(), |o| {
            o.remove("status");
            o.remove("code");
        });
        assert_eq!(paths(&v), ["Observation.status", "Observation.code"]);
    }

    #[test]
    fn unknown_elements_are_errors_at_every_level() {
        let v = with(observation(), |o| {
            o.insert("foo".into(), json!(1));
            o["code"]["coding"][0]
                .as_object_mut()
                .unwrap()
                .insert("cod".into(), json!("x"));
            o["valueQuantity"]
                .as_object_mut()
                .unwrap()
                .insert("units".into(), json!("x"));
        });
        assert_eq!(
            paths(&v),
            [
                "Observation.code.coding[0].cod",
                "Observation.valueQuantity.units",
                "Observation.foo",
            ]
        );
    }

    #[test]
    fn one_value_per_choice() {
        let v = with(observation(), |o| {
            o.insert("valueString".into(), json!("13.2"));
            o.insert("effectivePeriod".into(), json!({"start": "2024-03-01"}));
        });
        let issues = validate(&v);
        assert_eq!(issues.len(), 2, "{issues:#?}");
        assert!(issues.iter().any(|i| i.path == "Observation.valueString"
            && i.message.contains("valueQuantity")));
        assert!(
            issues
                .iter()
                .any(|i| i.path == "Observation.effectivePeriod")
        );
        let v = with(patient(), |o| {
            o.insert("deceasedBoolean".into(), json!(false));
            o.insert("deceasedDateTime".into(), json!("2020-01-01"));
            o.insert("multipleBirthBoolean".into(), json!(true));
            o.insert("multipleBirthInteger".into(), json!(2));
        });
        assert_eq!(
            paths(&v),
            ["Patient.deceasedDateTime", "Patient.multipleBirthInteger"]
        );
    }

    #[test]
    fn cardinality_shapes() {
        let v = with(observation(), |o| {
            o.insert("code".into(), json!([{"text": "x"}]));
            o.insert("category".into(), json!({"text": "x"}));
            o.insert("performer".into(), json!([]));
        });
        assert_eq!(
            paths(&v),
            [
                "Observation.category",
                "Observation.code",
                "Observation.performer"
            ]
        );
    }

    #[test]
    fn json_rules() {
        let v = with(observation(), |o| {
            o.insert("issued".into(), Value::Null);
            o["code"]["coding"][0]["display"] = json!("");
            o["valueQuantity"] = json!({});
            o.insert("interpretation".into(), json!([null]));
        });
        assert_eq!(
            paths(&v),
            [
                "Observation.code.coding[0].display",
                "Observation.valueQuantity",
                "Observation.issued",
                "Observation.interpretation[0]",
            ]
        );
    }

    #[test]
    fn primitive_formats() {
        let v = with(observation(), |o| {
            o["effectiveDateTime"] = json!("2024-03-01T08:30:00");
            o["valueQuantity"]["value"] = json!("13.2");
            o.insert("id".into(), json!("obs 1"));
            o["code"]["coding"][0]["system"] = json!("http://loinc .org");
            o.insert("issued".into(), json!("2024-03-01"));
        });
        assert_eq!(
            paths(&v),
            [
                "Observation.code.coding[0].system",
                "Observation.effectiveDateTime",
                "Observation.valueQuantity.value",
                "Observation.id",
                "Observation.issued",
            ]
        );
        let v = with(patient(), |o| {
            o["birthDate"] = json!("1970-02-30");
            o.insert("active".into(), json!("true"));
        });
        assert_eq!(paths(&v), ["Patient.birthDate", "Patient.active"]);
    }

    #[test]
    fn required_bindings() {
        let v = with(patient(), |o| {
            o["gender"] = json!("M");
            o["identifier"][0]["use"] = json!("primary");
            o["text"]["status"] = json!("none");
        });
        let issues = validate(&v);
        assert_eq!(
            issues.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(),
            [
                "Patient.text.status",
                "Patient.identifier[0].use",
                "Patient.gender"
            ]
        );
        assert!(
            issues[2]
                .message
                .contains("male | female | other | unknown")
        );
        assert!(!issues[2].message.contains("\"M\""));
        let v = with(observation(), |o| {
            o["status"] = json!("done");
            o["valueQuantity"]["comparator"] = json!("~");
        });
        assert_eq!(
            paths(&v),
            ["Observation.status", "Observation.valueQuantity.comparator"]
        );
    }

    #[test]
    fn simple_quantity_has_no_comparator() {
        let v = with(observation(), |o| {
            o["referenceRange"][0]["low"]["comparator"] = json!("<");
        });
        assert_eq!(paths(&v), ["Observation.referenceRange[0].low.comparator"]);
    }

    #[test]
    fn extensions() {
        let v = with(patient(), |o| {
            o["extension"][0]["extension"][1]
                .as_object_mut()
                .unwrap()
                .remove("url");
            o["extension"][0]["extension"][0]
                .as_object_mut()
                .unwrap()
                .insert("valueCode".into(), json!("x"));
            o["extension"]
                .as_array_mut()
                .unwrap()
                .push(json!({"url": "http://x"}));
        });
        assert_eq!(
            paths(&v),
            [
                "Patient.extension[0].extension[0].valueCode",
                "Patient.extension[0].extension[1].url",
                "Patient.extension[1]",
            ]
        );
    }

    #[test]
    fn primitive_extensions() {
        let v = with(patient(), |o| {
            o.insert(
                "_birthDate".into(),
                json!({"extension": [{"url": "http://x", "valueDateTime": "1970-01-01T10:00:00Z"}]}),
            );
        });
        assert_eq!(validate(&v), vec![]);
        let v = with(patient(), |o| {
            o.insert("_gender".into(), json!("x"));
            o.insert("_identifier".into(), json!({}));
        });
        assert_eq!(paths(&v), ["Patient._gender", "Patient._identifier"]);
    }

    #[test]
    fn narrative_and_invariants() {
        let v = with(patient(), |o| {
            o["text"]["div"] = json!("<p>x</p>");
        });
        assert_eq!(paths(&v), ["Patient.text.div"]);
        let v = with(observation(), |o| {
            o.insert("dataAbsentReason".into(), json!({"text": "x"}));
            o["referenceRange"] = json!([{"type": {"text": "normal"}}]);
        });
        assert_eq!(
            paths(&v),
            [
                "Observation.referenceRange[0]",
                "Observation.dataAbsentReason"
            ]
        );
        let v = with(observation(), |o| {
            o["valueQuantity"].as_object_mut().unwrap().remove("system");
            o.insert(
                "valueRange".into(),
                json!({"low": {"value": 5}, "high": {"value": 1}}),
            );
            o.remove("valueQuantity");
        });
        assert_eq!(paths(&v), ["Observation.valueRange.low"]);
        let v = with(observation(), |o| {
            o["valueQuantity"].as_object_mut().unwrap().remove("system");
        });
        assert_eq!(paths(&v), ["Observation.valueQuantity.system"]);
        let v = with(observation(), |o| {
            o.insert(
                "component".into(),
                json!([{"code": o["code"].clone(), "valueQuantity": {"value": 1}}]),
            );
        });
        assert_eq!(paths(&v), ["Observation.component[0].code"]);
    }

    #[test]
    fn datatype_and_patient_invariants() {
        let v = with(patient(), |o| {
            o.insert(
                "telecom".into(),
                json!([{"system": "phone", "period": {"start": "2024-02-01", "end": "2024-01-01"}}]),
            );
            o.insert("photo".into(), json!([{"data": "aGVsbG8="}]));
            o.insert(
                "contact".into(),
                json!([{"relationship": [{"text": "mother"}]}]),
            );
        });
        assert_eq!(
            paths(&v),
            [
                "Patient.telecom[0].period.start",
                "Patient.telecom[0].value",
                "Patient.photo[0].contentType",
                "Patient.contact[0]",
            ]
        );
        // Times with offsets compare as instants: 10:00+02:00 is before 09:00Z.
        let v = with(observation(), |o| {
            o.remove("effectiveDateTime");
            o.insert(
                "effectivePeriod".into(),
                json!({"start": "2024-03-01T10:00:00+02:00", "end": "2024-03-01T09:00:00Z"}),
            );
        });
        assert_eq!(validate(&v), vec![]);
    }

    #[test]
    fn nulls_in_primitive_arrays_need_an_extension() {
        let v = with(patient(), |o| {
            o.insert(
                "name".into(),
                json!([{"given": ["A", null], "_given": [null, {"extension": [{"url": "http://x", "valueString": "y"}]}]}]),
            );
        });
        assert_eq!(validate(&v), vec![]);
        let v = with(patient(), |o| {
            o.insert("name".into(), json!([{"given": ["A", null]}]));
        });
        assert_eq!(paths(&v), ["Patient.name[0].given[1]"]);
        let v = with(patient(), |o| {
            o.insert(
                "name".into(),
                json!([{"given": ["A"], "_given": {"id": "x"}}]),
            );
        });
        assert_eq!(paths(&v), ["Patient.name[0]._given"]);
    }

    #[test]
    fn contained_resources() {
        let v = with(observation(), |o| {
            o.insert(
                "contained".into(),
                json!([{"resourceType": "Patient", "id": "p", "gender": "x",
                        "meta": {"versionId": "1"},
                        "contained": [{"resourceType": "Patient", "id": "q"}]}]),
            );
        });
        assert_eq!(
            paths(&v),
            [
                "Observation.contained[0].gender",
                "Observation.contained[0].contained",
                "Observation.contained[0].meta.versionId",
            ]
        );
    }

    #[test]
    fn other_resource_types() {
        let v = json!({"resourceType": "Medication", "id": "m 1", "code": {"text": ""}, "meta": {"lastUpdated": "x"}});
        assert_eq!(
            paths(&v),
            [
                "Medication.id",
                "Medication.code.text",
                "Medication.meta.lastUpdated"
            ]
        );
        let v = json!({"resourceType": "Foo"});
        assert_eq!(paths(&v), ["Resource.resourceType"]);
        assert_eq!(paths(&json!({"id": "x"})), ["Resource.resourceType"]);
        assert_eq!(paths(&json!([1])), ["Resource"]);
    }

    fn entry(i: u8, resource: Value) -> Value {
        let rt = resource["resourceType"].as_str().unwrap().to_owned();
        json!({
            "fullUrl": format!("urn:uuid:00000000-0000-0000-0000-00000000000{i}"),
            "resource": resource,
            "request": {"method": "POST", "url": rt}
        })
    }

    #[test]
    fn transaction_bundles() {
        let b = json!({"resourceType": "Bundle", "type": "transaction",
            "entry": [entry(1, patient()), entry(2, observation())]});
        assert_eq!(validate(&b), vec![]);

        let mut bad = b.clone();
        bad["entry"][1]["resource"]["status"] = json!("done");
        bad["entry"][0]["request"]["method"] = json!("post");
        bad["entry"][1]["fullUrl"] = bad["entry"][0]["fullUrl"].clone();
        bad["entry"]
            .as_array_mut()
            .unwrap()
            .push(json!({"fullUrl": "urn:uuid:00000000-0000-0000-0000-000000000003"}));
        bad.as_object_mut()
            .unwrap()
            .insert("total".into(), json!(3));
        assert_eq!(
            paths(&bad),
            [
                "Bundle.entry[0].request.method",
                "Bundle.entry[1].resource.status",
                "Bundle.total",
                "Bundle.entry[1].fullUrl",
                "Bundle.entry[2].request",
                "Bundle.entry[2]",
            ]
        );
        let mut bad = b.clone();
        bad["type"] = json!("transfer");
        bad["entry"][0]["request"]
            .as_object_mut()
            .unwrap()
            .remove("url");
        assert_eq!(paths(&bad), ["Bundle.type", "Bundle.entry[0].request.url"]);
        // Searchset-only and response-only parts, version-specific fullUrls.
        let mut bad = b.clone();
        bad["entry"][0]["search"] = json!({"mode": "match"});
        bad["entry"][0]["fullUrl"] = json!("http://x/Patient/1/_history/2");
        assert_eq!(
            paths(&bad),
            ["Bundle.entry[0].search", "Bundle.entry[0].fullUrl"]
        );
        let mut bad = b.clone();
        bad["type"] = json!("transaction-response");
        bad["entry"][1]["response"] = json!({"status": "201 Created"});
        assert_eq!(paths(&bad), ["Bundle.entry[0].response"]);
        // Bundle is not a DomainResource.
        let mut bad = b;
        bad.as_object_mut()
            .unwrap()
            .insert("text".into(), json!({"status": "empty"}));
        assert_eq!(paths(&bad), ["Bundle.text"]);
    }

    #[test]
    fn messages_never_carry_values() {
        let v = with(patient(), |o| {
            o["birthDate"] = json!("SECRET-1970");
            o["gender"] = json!("SECRET");
            o["identifier"][0]["use"] = json!("SECRET");
        });
        for issue in validate(&v) {
            assert!(!issue.message.contains("SECRET"), "{issue}");
        }
    }
}
