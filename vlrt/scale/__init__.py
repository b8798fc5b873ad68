"""Scale-out: a video split into segments with halos, rendered on Ray and joined without re-encoding."""
