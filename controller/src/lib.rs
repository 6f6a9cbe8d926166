//! EdgeFleet controller library.
