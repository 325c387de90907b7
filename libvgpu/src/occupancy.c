/*
 * Occupancy, computed in the zone from the function's attributes (what libvgpu read from its
 * cubin) and the device snapshot, with the formula of NVIDIA's occupancy calculator
 * (cuda_occupancy.h): the blocks of `blockSize` threads one SM holds is the least of
 *   - the SM's block limit (CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR),
 *   - its warps: (max threads per SM / warp size) / warps per block,
 *   - its registers: (registers per SM / registers per warp) / warps per block, a warp's
 *     registers being registers per thread * warp size rounded up to the allocation unit (256),
 *   - its shared memory: shared memory per SM / (static + dynamic + the per-block reserve,
 *     rounded up to the allocation unit of 128 bytes),
 * and zero for a block larger than the function allows. No call leaves the process.
 */
#include "vgpu.h"

#define REG_ALLOC_UNIT 256
#define SMEM_ALLOC_UNIT 128

static int attribute(CUdevice_attribute attrib, CUdevice dev)
{
    int value = 0;
    (void)cuDeviceGetAttribute(&value, attrib, dev);
    return value;
}

static int round_up(int value, int unit)
{
    return (value + unit - 1) / unit * unit;
}

static int min_int(int a, int b)
{
    return a < b ? a : b;
}

/* Blocks per SM for one configuration of an already described function. */
static int active_blocks(const struct vgpu_function_info *f, int block_size, size_t dynamic)
{
    CUdevice dev = f->device;
    int warp = attribute(CU_DEVICE_ATTRIBUTE_WARP_SIZE, dev);
    int warps, blocks, smem;

    if (block_size <= 0 || (uint32_t)block_size > f->max_threads || warp <= 0 ||
        dynamic > (size_t)f->max_dynamic_shared)
        return 0;
    warps = (block_size + warp - 1) / warp;
    blocks = attribute(CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR, dev);
    blocks = min_int(blocks,
                     attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, dev) / warp /
                         warps);
    if (f->attrs.num_regs) {
        int per_warp = round_up((int)f->attrs.num_regs * warp, REG_ALLOC_UNIT);
        blocks = min_int(blocks,
                         attribute(CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR, dev) /
                             per_warp / warps);
    }
    smem = round_up((int)f->attrs.shared_static + (int)dynamic +
                        attribute(CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK, dev),
                    SMEM_ALLOC_UNIT);
    if (smem > 0)
        blocks = min_int(
            blocks, attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, dev) / smem);
    return blocks;
}

VGPU_API CUresult CUDAAPI cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    int *numBlocks, CUfunction func, int blockSize, size_t dynamicSMemSize, unsigned int flags)
{
    struct vgpu_function_info f;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!numBlocks || blockSize <= 0 || (flags & ~CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE))
        return CUDA_ERROR_INVALID_VALUE;
    r = vgpu_function_attributes(func, &f);
    if (r)
        return r;
    *numBlocks = active_blocks(&f, blockSize, dynamicSMemSize);
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuOccupancyMaxActiveBlocksPerMultiprocessor(int *numBlocks,
                                                                      CUfunction func,
                                                                      int blockSize,
                                                                      size_t dynamicSMemSize)
{
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(numBlocks, func, blockSize,
                                                                dynamicSMemSize, 0);
}

/* The block size (a multiple of the warp size, the largest on a tie) with the most threads
 * resident per SM, and the grid that fills every SM with such blocks. */
VGPU_API CUresult CUDAAPI cuOccupancyMaxPotentialBlockSizeWithFlags(
    int *minGridSize, int *blockSize, CUfunction func,
    CUoccupancyB2DSize blockSizeToDynamicSMemSize, size_t dynamicSMemSize, int blockSizeLimit,
    unsigned int flags)
{
    struct vgpu_function_info f;
    int warp, limit, best_size = 0, best_blocks = 0;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!minGridSize || !blockSize || blockSizeLimit < 0 ||
        (flags & ~CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE))
        return CUDA_ERROR_INVALID_VALUE;
    r = vgpu_function_attributes(func, &f);
    if (r)
        return r;
    warp = attribute(CU_DEVICE_ATTRIBUTE_WARP_SIZE, f.device);
    limit = (int)f.max_threads;
    if (blockSizeLimit && blockSizeLimit < limit)
        limit = blockSizeLimit;
    for (int size = limit / warp * warp; size > 0; size -= warp) {
        size_t dynamic = blockSizeToDynamicSMemSize ? blockSizeToDynamicSMemSize(size)
                                                    : dynamicSMemSize;
        int blocks = active_blocks(&f, size, dynamic);
        if (blocks * size > best_blocks * best_size) {
            best_blocks = blocks;
            best_size = size;
        }
    }
    *blockSize = best_size;
    *minGridSize = best_blocks * attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, f.device);
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuOccupancyMaxPotentialBlockSize(
    int *minGridSize, int *blockSize, CUfunction func,
    CUoccupancyB2DSize blockSizeToDynamicSMemSize, size_t dynamicSMemSize, int blockSizeLimit)
{
    return cuOccupancyMaxPotentialBlockSizeWithFlags(minGridSize, blockSize, func,
                                                     blockSizeToDynamicSMemSize,
                                                     dynamicSMemSize, blockSizeLimit, 0);
}
