//! fhirlift: registry files in, CIBMTR FHIR submissions out.
