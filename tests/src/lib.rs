//! Support code for hoard's end-to-end tests.
