"""tinyutils: a tiny utility package used to synthesize SWE tasks in rayrl's tests."""
