// The TensorRT plugin (IPluginV3, "SelectTokens" version "1", no namespace) that runs the
// `compressor.SelectTokens` node of the sparse prefill graph as one CUDA kernel sequence
// (select_tokens_kernel.cu) instead of the inlined standard layers. Inputs: the filter layer's last
// query (batch, heads, 1, dim) and keys (batch, kv heads, tokens, dim), float or half, and the
// attention mask (batch, tokens) int64; output: the kept positions (batch, keep_tokens) int64,
// increasing. Attributes: keep_tokens, keep_first, keep_last, pool_width (kv_groups is read from the
// shapes). The library exports getCreators and setLoggerFinder, so IPluginRegistry::loadLibrary registers it.
#include "select_tokens_kernel.h"

#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

char const* const kName = "SelectTokens";
char const* const kVersion = "1";
char const* const kNamespace = "";
char const* const kFields[] = {"keep_tokens", "keep_first", "keep_last", "pool_width", "kv_groups"};
constexpr int32_t kNbFields = 5;

struct Settings
{
    int32_t keepTokens{0};
    int32_t keepFirst{0};
    int32_t keepLast{0};
    int32_t poolWidth{1};
    int32_t kvGroups{1};

    int32_t* slot(int32_t index)
    {
        int32_t* slots[] = {&keepTokens, &keepFirst, &keepLast, &poolWidth, &kvGroups};
        return slots[index];
    }
};

// A field's integer value, whatever width the parser or the engine gave it.
bool readInt(PluginField const& field, int32_t& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case PluginFieldType::kINT64: value = static_cast<int32_t>(*static_cast<int64_t const*>(field.data)); return true;
    default: return false;
    }
}

class SelectTokensPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    explicit SelectTokensPlugin(Settings const& settings)
        : mSettings(settings)
    {
        for (int32_t i = 0; i < kNbFields; ++i)
        {
            mSerialized.emplace_back(kFields[i], mSettings.slot(i), PluginFieldType::kINT32, 1);
        }
        mCollection.nbFields = kNbFields;
        mCollection.fields = mSerialized.data();
    }

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        auto* copy = new (std::nothrow) SelectTokensPlugin(mSettings);
        if (copy != nullptr)
        {
            copy->mShape = mShape;
            copy->mHalf = mHalf;
        }
        return copy;
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* /*inputTypes*/,
        int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != 3)
        {
            return -1;
        }
        outputTypes[0] = DataType::kINT64;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 4 || inputs[1].nbDims != 4 || inputs[2].nbDims != 2)
        {
            return -1;
        }
        outputs[0].nbDims = 2;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = exprBuilder.constant(mSettings.keepTokens);
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case 0: return desc.type == DataType::kFLOAT || desc.type == DataType::kHALF;
        case 1: return desc.type == inOut[0].desc.type;
        default: return desc.type == DataType::kINT64;  // the mask and the selection
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1)
        {
            return -1;
        }
        mHalf = in[0].desc.type == DataType::kHALF;
        return 0;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        return select_tokens::workspaceBytes(shapeOf(inputs[0].max, inputs[1].max));
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1)
        {
            return -1;
        }
        mShape = shapeOf(in[0].dims, in[1].dims);
        mHalf = in[0].type == DataType::kHALF;
        return mShape.tokens >= mSettings.keepTokens ? 0 : -1;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        select_tokens::Shape const shape = shapeOf(inputDesc[0].dims, inputDesc[1].dims);
        cudaError_t const status = select_tokens::launch(shape, inputDesc[0].type == DataType::kHALF, inputs[0],
            inputs[1], static_cast<int64_t const*>(inputs[2]), static_cast<int64_t*>(outputs[0]), workspace, stream);
        return status == cudaSuccess ? 0 : -1;
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &mCollection; }

private:
    select_tokens::Shape shapeOf(Dims const& query, Dims const& keys) const
    {
        select_tokens::Shape shape{};
        shape.batch = static_cast<int32_t>(query.d[0]);
        shape.heads = static_cast<int32_t>(query.d[1]);
        shape.kvHeads = static_cast<int32_t>(keys.d[1]);
        shape.tokens = static_cast<int32_t>(keys.d[2]);
        shape.headDim = static_cast<int32_t>(query.d[3]);
        shape.keepTokens = mSettings.keepTokens;
        shape.keepFirst = mSettings.keepFirst;
        shape.keepLast = mSettings.keepLast;
        shape.poolWidth = mSettings.poolWidth;
        return shape;
    }

    Settings mSettings;
    select_tokens::Shape mShape{};
    bool mHalf{false};
    std::vector<PluginField> mSerialized;
    PluginFieldCollection mCollection{};
};

class SelectTokensCreator : public IPluginCreatorV3One
{
public:
    SelectTokensCreator()
    {
        for (char const* name : kFields)
        {
            mFields.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
        }
        mCollection.nbFields = kNbFields;
        mCollection.fields = mFields.data();
    }

    IPluginV3* createPlugin(AsciiChar const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override
    {
        Settings settings;
        bool seen[kNbFields] = {};
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            for (int32_t j = 0; j < kNbFields; ++j)
            {
                if (fc->fields[i].name != nullptr && std::strcmp(fc->fields[i].name, kFields[j]) == 0)
                {
                    seen[j] = readInt(fc->fields[i], *settings.slot(j));
                }
            }
        }
        // keep_tokens is required; the filter's settings bounds were checked when the recipe was read.
        if (!seen[0] || settings.keepTokens < 1 || settings.poolWidth < 1 || settings.poolWidth % 2 == 0
            || settings.keepFirst < 0 || settings.keepLast < 0 || settings.keepFirst + settings.keepLast > settings.keepTokens)
        {
            return nullptr;
        }
        return new (std::nothrow) SelectTokensPlugin(settings);
    }

    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

} // namespace

// The engine's logger, offered by TensorRT when it loads the library (unused: the plugin logs nothing).
extern "C" void setLoggerFinder(ILoggerFinder* /*finder*/) {}

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static SelectTokensCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
