import { referenceBackend } from '@fastmax/core/reference';
import { runConformance } from '../src/index.js';

// Core's float64 reference backend must pass the whole suite at full sizes.
runConformance({ name: 'reference', create: () => referenceBackend() });
