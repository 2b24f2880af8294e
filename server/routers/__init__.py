"""One router per resource: health, models, encode, decode, stream."""
