//! The mapping stage: typed rows → FHIR resources through minijinja templates, in parallel.
