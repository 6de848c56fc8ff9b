/* A stand-in CUDA driver for scripts/ptxas_report.py: the Mosaic GPU compiler asks the driver
 * for nothing but the device's compute capability before it runs ptxas, so answering that is
 * enough to compile a kernel on a machine without a GPU. Every other call fails, which ends the
 * compile right after ptxas (loading the module needs a real driver).
 *
 * Built by the script: gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o libcuda.so.1 fake_libcuda.c
 * FAKE_CUDA_CC=MAJOR.MINOR picks the capability (default 9.0: H100/H200, compiled for sm_90a).
 */
#include <stdio.h>
#include <stdlib.h>

typedef int CUresult;
typedef int CUdevice;

enum { CU_ATTRIBUTE_CC_MAJOR = 75, CU_ATTRIBUTE_CC_MINOR = 76, CUDA_ERROR_NOT_SUPPORTED = 801 };

static void capability(int *major, int *minor) {
  const char *cc = getenv("FAKE_CUDA_CC");
  *major = 9, *minor = 0;
  if (cc && sscanf(cc, "%d.%d", major, minor) != 2) *major = 9, *minor = 0;
}

CUresult cuInit(unsigned flags) { return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 12080; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return 0; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = 0; return 0; }
CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return 0; }

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  int major, minor;
  capability(&major, &minor);
  if (attribute == CU_ATTRIBUTE_CC_MAJOR) { *value = major; return 0; }
  if (attribute == CU_ATTRIBUTE_CC_MINOR) { *value = minor; return 0; }
  *value = 0;
  return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  *text = "not supported by scripts/fake_libcuda.c (no GPU)";
  return 0;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
  *name = "CUDA_ERROR_NOT_SUPPORTED";
  return 0;
}
