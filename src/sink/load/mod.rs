//! The loader: OAuth2 token → CRID → Patient → Observations, against the chosen target.
